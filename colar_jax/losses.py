"""SFT objectives, one function per paper equation, and the method registry.

Every method's loss has the signature of :data:`LossFn`:
``loss_fn(model, batch, key, *, c, cfg) -> (loss, metrics)`` where ``batch`` is
the device dict of ``colar_jax.data.encode_sft_batch`` (question / steps /
answer ids and masks), ``c`` the static compression factor of the batch and
``cfg`` a hashable :class:`LossConfig`. The shared train step
(``train_state.train_step``) looks the function up in :data:`LOSSES`; baselines
register theirs with :func:`register_loss`.

Cross-entropy follows HF causal-LM semantics (the output before a token
predicts it; the mean is over all supervised tokens of the batch), computed
only on the positions that have a label, so no [B, L, V] logits of the prompt
are ever materialised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from colar_jax.compression import CompressedChain, compress_chain
from colar_jax.model import CoLaRModel, Gaussian

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static (hashable) loss hyper-parameters; part of the step's compile key."""

  embed_std: float = 0.02
  ce_weight: float = 1.0
  embed_modeling_weight: float = 1.0
  embed_modeling_loss: str = "mse"  # "mse" | "nll"
  entropy_weight: float = 0.0
  pred_embed_forward_weight: float = 0.0
  sqrt_mean: bool = True
  random_label: bool = True
  end_latent_loss: bool = True

  @classmethod
  def from_config(cls, c: Any, embed_std: float) -> "LossConfig":
    k = c.colar
    return cls(embed_std=float(embed_std), ce_weight=float(k.ce_weight),
               embed_modeling_weight=float(k.embed_modeling_weight),
               embed_modeling_loss=str(k.embed_modeling_loss),
               entropy_weight=float(k.entropy_weight),
               pred_embed_forward_weight=float(k.pred_embed_forward_weight),
               sqrt_mean=bool(k.sqrt_mean), random_label=bool(k.random_label),
               end_latent_loss=bool(k.get("end_latent_loss", True)))


LossFn = Callable[..., tuple[jax.Array, Metrics]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
  """Decorator: ``@register_loss("icot")`` plugs a method into the shared step."""
  def deco(fn: LossFn) -> LossFn:
    LOSSES[name] = fn
    return fn
  return deco


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``x`` over ``mask``; 0 (not NaN) when nothing is selected."""
  mask = mask.astype(jnp.float32)
  return (x.astype(jnp.float32) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def next_token_ce(model: CoLaRModel, hidden: jax.Array, mask: jax.Array, labels: jax.Array,
                  label_mask: jax.Array, start: int) -> tuple[jax.Array, jax.Array]:
  """Causal-LM CE over positions >= ``start``; each label is predicted from the
  output at the previous REAL position.

  With left-padded parts the sequence has holes (question pad | chain pad):
  a plain HF shift would predict a row's first chain token from a padding
  slot's output. Reading the last real position before each label makes the
  loss independent of how rows are padded (the reference's shift differs only
  for that first token of rows shorter than the batch's longest chain).
  ``hidden`` [B, L, D]; ``mask``/``labels``/``label_mask`` [B, L]. Logits are
  computed only for the supervised span, in float32. Returns (mean CE over
  supervised tokens, their count).
  """
  if start < 1:
    raise ValueError("the first supervised position must follow a prompt (start >= 1)")
  length = hidden.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  last_real = jax.lax.cummax(jnp.where(mask, idx, -1), axis=1)
  prev = jnp.concatenate([jnp.full_like(last_real[:, :1], -1), last_real[:, :-1]], axis=1)
  prev = prev[:, start:]
  h = jnp.take_along_axis(hidden, jnp.maximum(prev, 0)[..., None], axis=1)
  logits = model.lm.logits(h)
  w = (label_mask[:, start:] & (prev >= 0)).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, start:])
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0), w.sum()


def latent_loss(dist: Gaussian, target: jax.Array, mask: jax.Array, *, kind: str,
                sample: jax.Array) -> jax.Array:
  """Paper Eq. (latent head objective), per compressed position, masked mean.

  ``target`` is the next compressed embedding divided by ``embed_std`` (no
  gradient). ``mse``: mean over dims of (sample - target)^2 with a
  reparameterised ``sample`` of ``dist`` (as the reference: the sampling noise
  is part of the loss, which also pulls the predicted std down); ``nll``:
  -log N(target; mean, std) averaged over dims.
  """
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  if kind == "mse":
    per_pos = jnp.mean(jnp.square(sample - target), axis=-1)
  elif kind == "nll":
    if dist.log_std is None:
      raise ValueError("embed_modeling_loss='nll' needs a stochastic latent head "
                       "(model.latent_deterministic=False)")
    per_pos = -jnp.mean(dist.log_prob(target), axis=-1)
  else:
    raise ValueError(f"unknown embed_modeling_loss {kind!r} (mse, nll)")
  return masked_mean(per_pos, mask)


def _concat_parts(batch: Batch, model: CoLaRModel, chain_embeds: jax.Array,
                  chain_mask: jax.Array, chain_labels: jax.Array):
  """[question | chain | answer] embeddings, mask, labels and label mask."""
  lm = model.lm
  q_ids, q_mask = batch["question_ids"], batch["question_mask"].astype(bool)
  a_ids, a_mask = batch["answer_ids"], batch["answer_mask"].astype(bool)
  q_emb = lm.embed_tokens(q_ids)
  a_emb = lm.embed_tokens(a_ids)
  embeds = jnp.concatenate([q_emb, chain_embeds.astype(q_emb.dtype), a_emb], axis=1)
  mask = jnp.concatenate([q_mask, chain_mask, a_mask], axis=1)
  labels = jnp.concatenate([q_ids, chain_labels, a_ids], axis=1).astype(jnp.int32)
  label_mask = jnp.concatenate([jnp.zeros_like(q_mask), chain_mask, a_mask], axis=1)
  return embeds, mask, labels, label_mask


def pred_embed_inputs(chain: CompressedChain, pred: jax.Array, embed_std: float) -> jax.Array:
  """Chain inputs of the second forward: ``###`` kept, every later compressed
  position replaced by the head's prediction of it from the previous position
  (de-normalised by ``embed_std``), i.e. what the model sees at inference."""
  mask = chain.mask
  prev_mask = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
  is_first = mask & ~prev_mask
  shifted = jnp.pad(pred[:, :-1], ((0, 0), (1, 0), (0, 0))) * embed_std
  out = jnp.where(is_first[..., None], chain.embeds.astype(jnp.float32), shifted)
  return jnp.where(mask[..., None], out, 0.0).astype(chain.embeds.dtype)


@register_loss("colar")
def colar_sft_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int,
                   cfg: LossConfig) -> tuple[jax.Array, Metrics]:
  """Paper Eq. (CoLaR SFT objective): total = ce_w * CE + em_w * latent (+ extras).

  CE is on [question | compressed chain | ``###`` answer EOS] with one random
  real token of each block as its label; the latent head reads the last hidden
  state of every compressed position and predicts the next compressed
  embedding / embed_std (for the last one: the answer's first embedding, unless
  ``cfg.end_latent_loss`` is off).

  Why the last position can be left out: the rollout draws end-of-thinking from the LM
  head after each latent and only asks the latent head for a next latent when the draw
  says "go on", so the head's prediction at a chain's last position is never used. When
  the data let a chain stop or go on at the same point, training it toward the
  separator's embedding there blends the two targets, and the rollouts that go on are
  fed that blend (measured on the demo task: 58% accuracy after going on vs 99% after
  stopping; see BUILD_NOTES).
  """
  k_label, k_sample = jax.random.split(key)
  chain = compress_chain(model.lm.embed_tokens, batch["steps_ids"], batch["steps_mask"], c,
                         key=k_label, sqrt_mean=cfg.sqrt_mean, random_label=cfg.random_label)
  embeds, mask, labels, label_mask = _concat_parts(batch, model, chain.embeds, chain.mask,
                                                   chain.labels)
  q_len, tc = batch["question_ids"].shape[1], chain.mask.shape[1]
  out = model.lm(inputs_embeds=embeds, attention_mask=mask, logits=False)
  ce, n_tok = next_token_ce(model, out.hidden, mask, labels, label_mask, q_len)

  dist = model.latent_head(out.hidden[:, q_len:q_len + tc])
  pred = dist.sample(k_sample)
  target = embeds[:, q_len + 1:q_len + tc + 1].astype(jnp.float32) / cfg.embed_std
  # Chains are right-aligned in their tc slots: slot tc - 1 is every row's last one.
  em_mask = chain.mask if cfg.end_latent_loss else chain.mask.at[:, -1].set(False)
  em = latent_loss(dist, target, em_mask, kind=cfg.embed_modeling_loss, sample=pred)
  if dist.log_std is None:
    entropy = jnp.zeros((), jnp.float32)
  else:
    entropy = masked_mean(dist.entropy().mean(-1), em_mask)

  total = cfg.ce_weight * ce + cfg.embed_modeling_weight * em
  if cfg.entropy_weight:
    total = total + cfg.entropy_weight * entropy
  metrics: Metrics = dict(ce_loss=ce, embed_modeling_loss=em, entropy=entropy)
  if cfg.pred_embed_forward_weight:
    chain2 = pred_embed_inputs(chain, pred, cfg.embed_std)
    embeds2 = jnp.concatenate([embeds[:, :q_len], chain2, embeds[:, q_len + tc:]], axis=1)
    out2 = model.lm(inputs_embeds=embeds2, attention_mask=mask, logits=False)
    pef, _ = next_token_ce(model, out2.hidden, mask, labels, label_mask, q_len)
    total = total + cfg.pred_embed_forward_weight * pef
    metrics["pred_embed_forward_loss"] = pef
  metrics.update(total_loss=total, n_tokens=n_tok,
                 n_latent=chain.mask.sum(-1).astype(jnp.float32).mean())
  return total, metrics


@register_loss("cot")
def cot_sft_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int = 1,
                 cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Metrics]:
  """Explicit CoT SFT: CE on ``###`` steps ``###`` answer EOS after the question.

  The prompt carries ``(Thinking speed: 1)`` (the data pipeline's fixed speed
  for this method); ``c`` must be 1. This is also CoLaR at ``c = 1`` with the
  latent terms off.
  """
  del key
  if c != 1:
    raise ValueError(f"method 'cot' trains the uncompressed chain; got c={c}")
  s_mask = batch["steps_mask"].astype(bool)
  embeds, mask, labels, label_mask = _concat_parts(
      batch, model, model.lm.embed_tokens(batch["steps_ids"]), s_mask, batch["steps_ids"])
  out = model.lm(inputs_embeds=embeds, attention_mask=mask, logits=False)
  ce, n_tok = next_token_ce(model, out.hidden, mask, labels, label_mask,
                            batch["question_ids"].shape[1])
  total = cfg.ce_weight * ce
  return total, dict(total_loss=total, ce_loss=ce, n_tokens=n_tok)
