"""Continuous thoughts through the KV cache (Coconut and Distill share them).

The prompt is prefilled, then each thought's input embedding is the previous position's
last hidden state (optionally through ``model.latent_proj``), in a ``lax.scan``;
gradients flow through every thought (Coconut back-propagates through the whole
recurrence). The text then runs teacher-forced through the same cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from colar_jax.model import CoLaRModel, KVCache


@flax.struct.dataclass
class ThoughtPass:
  """Outputs over ``[prompt | thoughts | text]``."""

  hidden: jax.Array  # [B, P+N+T, D] last hidden states
  mask: jax.Array  # [B, P+N+T] bool
  thoughts: jax.Array  # [B, N, D] the input embeddings fed as thoughts
  text_all_hidden: jax.Array | None  # [L+1, B, T, D] (text part, on request)


def project(model: CoLaRModel, hidden: jax.Array) -> jax.Array:
  """Next thought's input embedding: the hidden state, through ``latent_proj`` if any.

  The model's structure decides (``ModelConfig.latent_proj_size``), so the evaluator's
  rollout (``projection="latent_proj"`` exactly when the module exists) can't disagree.
  """
  proj = getattr(model, "latent_proj", None)
  return hidden if proj is None else proj(hidden)


def thought_pass(
  model: CoLaRModel,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  n_thoughts: int,
  text_ids: jax.Array,
  text_mask: jax.Array,
  *,
  all_hidden: bool = False,
) -> ThoughtPass:
  """Prefill ``prompt`` (left padded), run ``n_thoughts`` thoughts, then the text.

  Static shapes: one cache of ``P + N + T`` slots. The prompt's last column is every
  row's last real token (left padding), whose hidden state seeds the first thought.
  """
  lm = model.lm
  b, p = prompt_ids.shape
  prompt_mask = prompt_mask.astype(bool)
  text_mask = text_mask.astype(bool)
  cache = KVCache.init(lm.cfg, b, p + n_thoughts + text_ids.shape[1])
  pre = lm(prompt_ids, attention_mask=prompt_mask, cache=cache, logits=False)
  ones = jnp.ones((b, 1), bool)

  def step(carry, _):
    cache, h = carry
    emb = project(model, h)
    out = lm(inputs_embeds=emb[:, None], attention_mask=ones, cache=cache, logits=False)
    h_new = out.hidden[:, 0]
    return (out.cache, h_new), (emb.astype(jnp.float32), h_new)

  (cache, _), (embs, hs) = jax.lax.scan(
    step, (pre.cache, pre.hidden[:, -1]), None, length=n_thoughts
  )
  thoughts = jnp.swapaxes(embs, 0, 1)  # [B, N, D]
  th_hidden = jnp.swapaxes(hs, 0, 1).astype(pre.hidden.dtype)
  out = lm(
    text_ids, attention_mask=text_mask, cache=cache, logits=False, output_all_hidden=all_hidden
  )
  hidden = jnp.concatenate([pre.hidden, th_hidden, out.hidden], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones((b, n_thoughts), bool), text_mask], axis=1)
  return ThoughtPass(hidden=hidden, mask=mask, thoughts=thoughts, text_all_hidden=out.all_hidden)


def first_real(mask: jax.Array) -> jax.Array:
  """[B] column of each row's first real token (0 when the row is empty)."""
  return jnp.argmax(mask.astype(bool), axis=1).astype(jnp.int32)
