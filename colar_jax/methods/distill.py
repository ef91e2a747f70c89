"""Distill (CODI): a teacher reads the explicit chain, a student N continuous thoughts.

Teacher ``[prompt### | steps | ###Answer:a EOS]`` (CoT CE on steps + answer); student
``[prompt### | N thoughts | ###Answer:a EOS]`` (CE on the answer after its leading
separator, which the rollout inserts), thoughts through ``latent_proj``; smooth-L1
between their hidden states, all layers, at the token that predicts the answer.
Loss: ``alpha * teacher CE + beta * student CE + gamma * distillation``
(``baselines.distill``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from colar_jax import config as cfglib
from colar_jax.data.prompts import Speed
from colar_jax.data.records import Record
from colar_jax.methods.base import (
  Batch,
  EncodeContext,
  Method,
  Metrics,
  PromptSpec,
  check_uncompressed,
  concat_parts,
  hidden_decoding,
  next_token_ce,
  projection_width,
)
from colar_jax.methods.encoding import encode_staged
from colar_jax.methods.thoughts import thought_pass
from colar_jax.model import CoLaRModel


def smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Element-wise smooth-L1 with beta 1 (torch ``SmoothL1Loss`` default), float32."""
  d = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def hidden_distill_loss(student: jax.Array, teacher: jax.Array, div_std: bool) -> jax.Array:
  """Mean over layers of the per-layer mean smooth-L1; ``student/teacher`` [L, B, D].

  The teacher side gets no gradient (CODI runs the teacher under ``no_grad`` for this
  term; the reference ``.detach()``es it): distillation moves the student toward the
  teacher, never the teacher toward the student. ``div_std``: each layer's term is
  divided by the (sample) std of the teacher's selected states (CODI's option).
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  per_layer = smooth_l1(student, teacher).mean(axis=(1, 2))
  if div_std:
    per_layer = per_layer / jnp.std(teacher, axis=(1, 2), ddof=1)
  return per_layer.mean()


def _at(all_hidden: jax.Array, cols: jax.Array) -> jax.Array:
  """[L+1, B, T, D] -> [L, B, D]: per-row column ``cols`` [B] of layers 1..L.

  Layer 0 (the input embedding) is left out, as the reference: both sides embed the
  same token there, so it would add 0 and only rescale the mean.
  """
  idx = cols[None, :, None, None]
  return jnp.take_along_axis(all_hidden[1:], idx, axis=2)[:, :, 0]


@flax.struct.dataclass
class DistillTerms:
  teacher_ce: jax.Array
  student_ce: jax.Array
  distill: jax.Array
  n_teacher: jax.Array
  n_student: jax.Array
  teacher_hidden: jax.Array  # [L, B, D] selected (no gradient)
  student_hidden: jax.Array  # [L, B, D] selected
  thoughts: jax.Array  # [B, N, D] the student's thought embeddings


def distill_terms(model: CoLaRModel, batch: Batch, dcfg: cfglib.Distill) -> DistillTerms:
  """The three CODI terms (unweighted). Layouts (prompt ends with the separator):

  teacher ``[prompt### | steps | ###Answer:a EOS]`` (CoT CE on steps + answer);
  student ``[prompt### | N thoughts | ###Answer:a EOS]`` (CE on the answer after its
  leading separator, which the rollout inserts). Both are distilled at the answer
  column ``answer_pred_index`` (the ``:`` that predicts the answer's first token).
  """
  q_ids, q_mask = batch["question_ids"], batch["question_mask"]
  a_ids, a_mask = batch["answer_ids"], batch["answer_mask"].astype(bool)
  p, s, n = q_ids.shape[1], batch["steps_ids"].shape[1], batch["latent_mask"].shape[1]
  idx = batch["answer_pred_index"].astype(jnp.int32)
  b, a = a_ids.shape
  lm = model.lm
  embeds, mask, labels, label_mask = concat_parts(
    batch,
    model,
    lm.embed_tokens(batch["steps_ids"]),
    batch["steps_mask"].astype(bool),
    batch["steps_ids"],
  )
  t_out = lm(inputs_embeds=embeds, attention_mask=mask, logits=False, output_all_hidden=True)
  t_ce, t_n = next_token_ce(model, t_out.hidden, mask, labels, label_mask, p)

  tp = thought_pass(model, q_ids, q_mask, n, a_ids, a_mask, all_hidden=True)
  s_labels = jnp.concatenate([q_ids, jnp.zeros((b, n), q_ids.dtype), a_ids], 1)
  s_label_mask = jnp.concatenate(
    [jnp.zeros((b, p + n), bool), a_mask & (jnp.arange(a)[None] > 0)], 1
  )
  s_ce, s_n = next_token_ce(
    model, tp.hidden, tp.mask, s_labels.astype(jnp.int32), s_label_mask, p + n
  )

  teacher = _at(t_out.all_hidden, p + s + idx)
  student = _at(tp.text_all_hidden, idx)
  dist = hidden_distill_loss(student, teacher, dcfg.div_std)
  return DistillTerms(
    teacher_ce=t_ce,
    student_ce=s_ce,
    distill=dist,
    n_teacher=t_n,
    n_student=s_n,
    teacher_hidden=jax.lax.stop_gradient(teacher),
    student_hidden=student,
    thoughts=tp.thoughts,
  )


def distill_loss(
  model: CoLaRModel,
  batch: Batch,
  key: jax.Array | None = None,
  *,
  c: int = 1,
  dcfg: cfglib.Distill = cfglib.Distill(),
) -> tuple[jax.Array, Metrics]:
  """alpha * teacher CE + beta * student CE + gamma * distillation."""
  del key
  check_uncompressed("distill", c)
  t = distill_terms(model, batch, dcfg)
  total = dcfg.alpha * t.teacher_ce + dcfg.beta * t.student_ce + dcfg.gamma * t.distill
  return total, dict(
    total_loss=total,
    teacher_loss=t.teacher_ce,
    student_loss=t.student_ce,
    distill_loss=t.distill,
    n_tokens=t.n_student,
    n_latent=jnp.asarray(batch["latent_mask"].shape[1], jnp.float32),
  )


class Distill(Method):
  name = "distill"
  prompt = PromptSpec(speed="auto", separator=True)
  latent_mode = "hidden"

  def loss(self, model, batch, key, *, c, settings):
    return distill_loss(model, batch, key, c=c, dcfg=settings)

  def loss_settings(self, run: Any, embed_std: float) -> cfglib.Distill:
    return run.baselines.distill

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    # The teacher reads the whole chain right after the prompt's separator.
    return encode_staged(
      records,
      ctx,
      prompt=self.prompt,
      kept=[tuple(r.steps) for r in records],
      all_gone=False,
      opened=True,
      stage=stage,
      n_latents=int(run.baselines.distill.n_latents),
      answer_pred=True,
    )

  def rollout_overrides(self, run: Any, projection_size: int) -> dict[str, Any]:
    return hidden_decoding(run.baselines.distill.n_latents, projection_size)

  def projection_size(self, run: Any, hidden_size: int) -> int:
    return projection_width(run, run.baselines.distill.use_proj, hidden_size)


METHOD = Distill()
