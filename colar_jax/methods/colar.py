"""CoLaR SFT (paper Sec. 3.1-3.2): compressed chain CE + the latent head's objective.

Each batch draws one compression factor c from ``colar.factors`` (weights
``colar.factor_weights``), announced in the prompt as the thinking speed; the chain's
embeddings are merged c at a time (:func:`colar_jax.methods.compression.compress_chain`)
and the latent head learns to predict the next compressed embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from colar_jax import config as cfglib
from colar_jax.data.prompts import Speed, encode_sft_batch
from colar_jax.data.records import Record
from colar_jax.methods.base import (
  Batch,
  EncodeContext,
  Method,
  Metrics,
  PromptSpec,
  concat_parts,
  masked_mean,
  next_token_ce,
)
from colar_jax.methods.compression import CompressedChain, compress_chain
from colar_jax.model import CoLaRModel, Gaussian


@dataclasses.dataclass(frozen=True)
class ColarSettings:
  """Static loss settings: the ``colar`` section and the run's latent scale."""

  colar: cfglib.Colar = cfglib.Colar()
  embed_std: float = 0.02


def latent_loss(
  dist: Gaussian, target: jax.Array, mask: jax.Array, *, kind: str, sample: jax.Array
) -> jax.Array:
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
      raise ValueError(
        "embed_modeling_loss='nll' needs a stochastic latent head "
        "(model.latent_deterministic=False)"
      )
    per_pos = -jnp.mean(dist.log_prob(target), axis=-1)
  else:
    raise ValueError(f"unknown embed_modeling_loss {kind!r} (mse, nll)")
  return masked_mean(per_pos, mask)


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


def colar_loss(
  model: CoLaRModel,
  batch: Batch,
  key: jax.Array,
  *,
  c: int,
  settings: ColarSettings = ColarSettings(),
) -> tuple[jax.Array, Metrics]:
  """Paper Eq. (CoLaR SFT objective): total = ce_w * CE + em_w * latent (+ extras).

  CE is on [question | compressed chain | ``###`` answer EOS] with one random
  real token of each block as its label; the latent head reads the last hidden
  state of every compressed position and predicts the next compressed
  embedding / embed_std (for the last one: the answer's first embedding, unless
  ``cfg.end_latent_loss`` is off).

  Why the last position can be left out: the rollout draws end-of-thinking from the LM
  head after each latent and asks the latent head for a next latent only when the draw
  says "go on", so the head's prediction at a chain's last position is never used. When
  the data let a chain stop or go on at the same point, training it toward the
  separator's embedding blends the two targets (BUILD_NOTES, Stage 1, deviation 6).
  """
  cfg, embed_std = settings.colar, settings.embed_std
  k_label, k_sample = jax.random.split(key)
  chain = compress_chain(
    model.lm.embed_tokens,
    batch["steps_ids"],
    batch["steps_mask"],
    c,
    key=k_label,
    sqrt_mean=cfg.sqrt_mean,
    random_label=cfg.random_label,
  )
  embeds, mask, labels, label_mask = concat_parts(
    batch, model, chain.embeds, chain.mask, chain.labels
  )
  q_len, tc = batch["question_ids"].shape[1], chain.mask.shape[1]
  out = model.lm(inputs_embeds=embeds, attention_mask=mask, logits=False)
  ce, n_tok = next_token_ce(model, out.hidden, mask, labels, label_mask, q_len)

  dist = model.latent_head(out.hidden[:, q_len : q_len + tc])
  pred = dist.sample(k_sample)
  target = embeds[:, q_len + 1 : q_len + tc + 1].astype(jnp.float32) / embed_std
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
    chain2 = pred_embed_inputs(chain, pred, embed_std)
    embeds2 = jnp.concatenate([embeds[:, :q_len], chain2, embeds[:, q_len + tc :]], axis=1)
    out2 = model.lm(inputs_embeds=embeds2, attention_mask=mask, logits=False)
    pef, _ = next_token_ce(model, out2.hidden, mask, labels, label_mask, q_len)
    total = total + cfg.pred_embed_forward_weight * pef
    metrics["pred_embed_forward_loss"] = pef
  metrics.update(
    total_loss=total, n_tokens=n_tok, n_latent=chain.mask.sum(-1).astype(jnp.float32).mean()
  )
  return total, metrics


class CoLaR(Method):
  name = "colar"
  prompt = PromptSpec(speed="factor", separator=True)
  latent_mode = "sampled"

  def loss(self, model, batch, key, *, c, settings):
    return colar_loss(model, batch, key, c=c, settings=settings)

  def loss_settings(self, run: Any, embed_std: float) -> ColarSettings:
    return ColarSettings(colar=run.colar, embed_std=float(embed_std))

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    return encode_sft_batch(
      records,
      ctx.tokenizer,
      ctx.templates,
      speed,
      ctx.buckets,
      stats=ctx.stats,
      fixed_shapes=ctx.fixed_shapes,
    )

  def train_factors(self, run: Any) -> tuple[int, ...]:
    return tuple(run.colar.factors)

  def factor_weights(self, run: Any) -> tuple[float, ...]:
    return tuple(run.colar.factor_weights)

  def auto_prob(self, run: Any) -> float:
    return float(run.colar.auto_prob)


METHOD = CoLaR()
