"""Coconut: continuous thoughts replace the first reasoning steps, stage by stage.

Layout ``[prompt### | N thoughts | ###remaining steps | ###Answer:a EOS]``: stage s
(``baselines.coconut.curriculum``) turns the first s steps into
``s * n_latents_per_step`` thoughts (:mod:`colar_jax.methods.thoughts`), and the final
stage turns them all. Decoding runs the final stage's number of thoughts (reference: 3 x
2 = 6), each the last hidden state, through ``latent_proj`` when ``use_proj`` is on.

Labels are masks, never ids (pad may equal EOS): CE is taken on the real chain / answer
tokens only. Thoughts, padding and the end-of-thinking separator after the thoughts
(inserted, not predicted, at inference: the rollout appends it) carry no label. The CoLaR
reference computes Coconut's CE with ``labels=input_ids``, which also trains the model
to predict its padding; we do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from colar_jax.data.prompts import Speed
from colar_jax.data.records import Record
from colar_jax.methods.base import (
  Batch,
  EncodeContext,
  Method,
  Metrics,
  PromptSpec,
  check_uncompressed,
  hidden_decoding,
  next_token_ce,
  projection_width,
)
from colar_jax.methods.curriculum import stage_of
from colar_jax.methods.encoding import encode_curriculum
from colar_jax.methods.thoughts import first_real, thought_pass
from colar_jax.model import CoLaRModel


def n_thoughts(coconut: Any, stage: int) -> int:
  """Thoughts at ``stage``: ``min(stage, max_stage) * n_latents_per_step``."""
  return min(stage, int(coconut.curriculum.max_stage)) * int(coconut.n_latents_per_step)


def coconut_layout(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, int]:
  """Mask, labels, label mask over ``[prompt | thoughts | steps | answer]`` and N.

  Supervised: the real steps / answer tokens except the first one after the thoughts
  (the end-of-thinking separator, given at inference). Not supervised: prompt,
  thoughts, padding.
  """
  q_ids, q_mask = batch["question_ids"], batch["question_mask"].astype(bool)
  n = batch["latent_mask"].shape[1]
  text_ids = jnp.concatenate([batch["steps_ids"], batch["answer_ids"]], axis=1)
  text_mask = jnp.concatenate([batch["steps_mask"], batch["answer_mask"]], axis=1).astype(bool)
  b, t = text_ids.shape
  marker = jnp.arange(t)[None] == first_real(text_mask)[:, None]
  mask = jnp.concatenate([q_mask, jnp.ones((b, n), bool), text_mask], axis=1)
  labels = jnp.concatenate([q_ids, jnp.zeros((b, n), q_ids.dtype), text_ids], axis=1).astype(
    jnp.int32
  )
  label_mask = jnp.concatenate(
    [jnp.zeros_like(q_mask), jnp.zeros((b, n), bool), text_mask & ~marker], axis=1
  )
  return mask, labels, label_mask, n


def coconut_loss(
  model: CoLaRModel, batch: Batch, key: jax.Array | None = None, *, c: int = 1
) -> tuple[jax.Array, Metrics]:
  """Coconut stage loss: CE on the text after ``N = latent_mask.shape[1]`` thoughts."""
  del key
  check_uncompressed("coconut", c)
  mask, labels, label_mask, n = coconut_layout(batch)
  text_ids = jnp.concatenate([batch["steps_ids"], batch["answer_ids"]], axis=1)
  text_mask = jnp.concatenate([batch["steps_mask"], batch["answer_mask"]], axis=1)
  tp = thought_pass(model, batch["question_ids"], batch["question_mask"], n, text_ids, text_mask)
  p = batch["question_ids"].shape[1]
  ce, n_tok = next_token_ce(model, tp.hidden, mask, labels, label_mask, p + n)
  return ce, dict(total_loss=ce, ce_loss=ce, n_tokens=n_tok, n_latent=jnp.asarray(n, jnp.float32))


class Coconut(Method):
  name = "coconut"
  prompt = PromptSpec(speed="auto", separator=True)  # reference: "(Thinking speed: auto)###"
  latent_mode = "hidden"

  def loss(self, model, batch, key, *, c, settings):
    return coconut_loss(model, batch, key, c=c)

  def stage(self, run: Any, epoch: int) -> int:
    return stage_of(run.baselines.coconut.curriculum, epoch)

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    co = run.baselines.coconut
    return encode_curriculum(
      records,
      ctx,
      prompt=self.prompt,
      cur=co.curriculum,
      stage=stage,
      n_latents=n_thoughts(co, stage),
    )

  def rollout_overrides(self, run: Any, projection_size: int) -> dict[str, Any]:
    co = run.baselines.coconut
    return hidden_decoding(n_thoughts(co, co.curriculum.max_stage), projection_size)

  def projection_size(self, run: Any, hidden_size: int) -> int:
    return projection_width(run, run.baselines.coconut.use_proj, hidden_size)


METHOD = Coconut()
