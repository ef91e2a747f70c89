"""What a training method is, and the loss pieces every method shares.

A method is one :class:`Method` object in one file of this package (``cot.py``,
``colar.py``, ``nocot.py``, ``icot.py``, ``coconut.py``, ``distill.py``) and one line of
the registry in ``__init__.py``. The object answers every question the rest of the
package asks about a method:

* ``prompt``: how its prompt ends (speed suffix, trailing separator), the same at
  training and at decoding, so the two can never disagree;
* ``encode``: what one training / validation batch holds at a curriculum stage;
* ``loss``: its objective, ``loss(model, batch, key, *, c, settings) -> (loss, metrics)``
  with ``settings = method.loss_settings(run, embed_std)`` (hashable: part of the jitted
  step's compile key);
* ``train_factors`` / ``factor_weights`` / ``auto_prob``: the speeds drawn per batch;
* ``stage``: its curriculum stage at an epoch (0 without a curriculum);
* ``rollout_overrides``: how the shared rollout decodes it (latent mode, fixed number of
  thoughts, projection);
* ``projection_size``: the width of ``CoLaRModel.latent_proj`` it needs (0 = none).

``run`` is the typed run config (:class:`colar_jax.config.Run`). Cross-entropy follows
HF causal-LM semantics (the output before a token predicts it; the mean is over all
supervised tokens of the batch), computed only on positions that have a label, so no
``[B, L, V]`` logits of the prompt are ever materialised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from colar_jax.data.prompts import Buckets, EncodeStats, PromptTemplates, Speed
from colar_jax.data.records import Record
from colar_jax.model import CoLaRModel

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How a method's prompt ends: ``speed`` is "factor" (the compression factor being
  trained / evaluated), a fixed value (1, "auto"), or None (no speed suffix);
  ``separator``: the prompt ends with the thinking separator."""

  speed: int | str | None
  separator: bool

  @property
  def uses_factor(self) -> bool:
    return self.speed == "factor"

  def speed_for(self, factor: int) -> int | str | None:
    return factor if self.uses_factor else self.speed


@dataclasses.dataclass(frozen=True)
class EncodeContext:
  """What every batch encoder needs besides the records (picklable for grain)."""

  tokenizer: Any
  templates: PromptTemplates
  buckets: Buckets
  fixed_shapes: bool = False  # multi-host: every host pads to the largest bucket
  stats: EncodeStats | None = None


class Method:
  """Base of every method; subclasses set the class attributes and override what differs."""

  name: ClassVar[str]
  prompt: ClassVar[PromptSpec]
  latent_mode: ClassVar[str] = "none"  # how the rollout decodes it: sampled | hidden | none

  def loss(
    self, model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int, settings: Any
  ) -> tuple[jax.Array, Metrics]:
    raise NotImplementedError

  def loss_settings(self, run: Any, embed_std: float) -> Any:
    """The static (hashable) settings ``loss`` reads."""
    return None

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def train_factors(self, run: Any) -> tuple[int, ...]:
    return (1,)

  def factor_weights(self, run: Any) -> tuple[float, ...]:
    return ()

  def auto_prob(self, run: Any) -> float:
    return 0.0

  def stage(self, run: Any, epoch: int) -> int:
    return 0

  def rollout_overrides(self, run: Any, projection_size: int) -> dict[str, Any]:
    return dict(latent_mode=self.latent_mode)

  def projection_size(self, run: Any, hidden_size: int) -> int:
    return 0

  def __repr__(self) -> str:
    return f"<method {self.name}>"


@dataclasses.dataclass(frozen=True)
class MethodEncoder:
  """The grain ``encode_fn(records, speed, epoch)`` of a method: the stage comes from the
  epoch. A picklable class (not a closure) for grain's multiprocessing prefetch."""

  method: Method
  run: Any
  ctx: EncodeContext

  def stage(self, epoch: int) -> int:
    return self.method.stage(self.run, epoch)

  def __call__(self, records: list[Record], speed: Speed, epoch: int) -> dict[str, np.ndarray]:
    return self.method.encode(self.run, records, self.ctx, speed=speed, stage=self.stage(epoch))


def projection_width(run: Any, use_proj: bool, hidden_size: int) -> int:
  """Width of ``CoLaRModel.latent_proj`` (Coconut ``use_proj`` / Distill): 0 = none,
  else ``baselines.proj_hidden_size`` or the model's hidden size."""
  if not use_proj:
    return 0
  width = int(run.baselines.proj_hidden_size)
  return width if width > 0 else int(hidden_size)


def hidden_decoding(n_latents: int, projection_size: int) -> dict[str, Any]:
  """Rollout overrides of a fixed-length continuous-thought method (Coconut, Distill):
  ``n_latents`` last hidden states, through ``latent_proj`` when the model has one."""
  return dict(
    latent_mode="hidden",
    max_latent_steps=int(n_latents),
    projection="latent_proj" if projection_size > 0 else None,
  )


def check_uncompressed(method: str, c: int) -> None:
  if c != 1:
    raise ValueError(f"method {method!r} does not compress its chain; got c={c}")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``x`` over ``mask``; 0 (not NaN) when nothing is selected."""
  mask = mask.astype(jnp.float32)
  return (x.astype(jnp.float32) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def next_token_ce(
  model: CoLaRModel,
  hidden: jax.Array,
  mask: jax.Array,
  labels: jax.Array,
  label_mask: jax.Array,
  start: int,
) -> tuple[jax.Array, jax.Array]:
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


def concat_parts(
  batch: Batch,
  model: CoLaRModel,
  chain_embeds: jax.Array,
  chain_mask: jax.Array,
  chain_labels: jax.Array,
):
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
