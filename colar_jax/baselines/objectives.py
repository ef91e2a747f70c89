"""Baseline SFT objectives, registered in ``losses.LOSSES`` for the shared train step.

All four read the batches of :mod:`colar_jax.baselines.encoding`:

* ``nocot`` / ``icot``: the CoT objective (``losses.cot_sft_loss``) on what the
  encoder kept, i.e. CE on ``[###remaining steps] ###Answer:a EOS`` after the prompt.
* ``coconut``: ``[prompt###] [N thoughts] [###remaining steps] [###Answer:a EOS]``. The
  thoughts are computed SEQUENTIALLY through the KV cache: the prompt is prefilled,
  then each thought's input embedding is the previous position's last hidden state
  (optionally through ``model.latent_proj``), in a ``lax.scan``; gradients flow
  through every thought (Coconut back-propagates through the whole recurrence). The
  text then runs teacher-forced through the same cache.
* ``distill`` (CODI): teacher = the same model on the explicit chain; student = prompt
  + N thoughts (through ``latent_proj``) + answer; smooth-L1 between their hidden
  states, all layers, at the token that predicts the answer.

Labels are masks, never ids (pad may equal EOS): CE is taken on real answer / chain
tokens only. Continuous thoughts, padding and the end-of-thinking separator that
follows the thoughts (inserted, not predicted, at inference: the rollout appends it)
carry no label. The CoLaR reference computes Coconut's CE with ``labels=input_ids``,
which also trains the model to predict its padding; we do not.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from colar_jax.baselines.schedule import DistillConfig
from colar_jax.losses import (Batch, LossConfig, Metrics, _concat_parts, cot_sft_loss,
                              next_token_ce, register_loss)
from colar_jax.model import CoLaRModel, KVCache


def _check_c(method: str, c: int) -> None:
  if c != 1:
    raise ValueError(f"method {method!r} does not compress its chain; got c={c}")


@register_loss("nocot")
def nocot_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int = 1,
               cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Metrics]:
  """No-CoT: CE on ``###Answer:a EOS`` right after the question (zero-width chain)."""
  _check_c("nocot", c)
  return cot_sft_loss(model, batch, key, c=1, cfg=cfg)


@register_loss("icot")
def icot_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int = 1,
              cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Metrics]:
  """iCoT: CoT CE on the steps the curriculum kept (the removal happens in the encoder)."""
  _check_c("icot", c)
  return cot_sft_loss(model, batch, key, c=1, cfg=cfg)


# ----------------------------------------------------------------------------
# Continuous thoughts through the KV cache
# ----------------------------------------------------------------------------
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


def thought_pass(model: CoLaRModel, prompt_ids: jax.Array, prompt_mask: jax.Array,
                 n_thoughts: int, text_ids: jax.Array, text_mask: jax.Array, *,
                 all_hidden: bool = False) -> ThoughtPass:
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

  (cache, _), (embs, hs) = jax.lax.scan(step, (pre.cache, pre.hidden[:, -1]), None,
                                        length=n_thoughts)
  thoughts = jnp.swapaxes(embs, 0, 1)  # [B, N, D]
  th_hidden = jnp.swapaxes(hs, 0, 1).astype(pre.hidden.dtype)
  out = lm(text_ids, attention_mask=text_mask, cache=cache, logits=False,
           output_all_hidden=all_hidden)
  hidden = jnp.concatenate([pre.hidden, th_hidden, out.hidden], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones((b, n_thoughts), bool), text_mask], axis=1)
  return ThoughtPass(hidden=hidden, mask=mask, thoughts=thoughts,
                     text_all_hidden=out.all_hidden)


def first_real(mask: jax.Array) -> jax.Array:
  """[B] column of each row's first real token (0 when the row is empty)."""
  return jnp.argmax(mask.astype(bool), axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Coconut
# ----------------------------------------------------------------------------
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
  labels = jnp.concatenate([q_ids, jnp.zeros((b, n), q_ids.dtype), text_ids],
                           axis=1).astype(jnp.int32)
  label_mask = jnp.concatenate([jnp.zeros_like(q_mask), jnp.zeros((b, n), bool),
                                text_mask & ~marker], axis=1)
  return mask, labels, label_mask, n


@register_loss("coconut")
def coconut_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int = 1,
                 cfg: LossConfig = LossConfig()) -> tuple[jax.Array, Metrics]:
  """Coconut stage loss: CE on the text after ``N = latent_mask.shape[1]`` thoughts."""
  del key
  _check_c("coconut", c)
  mask, labels, label_mask, n = coconut_layout(batch)
  text_ids = jnp.concatenate([batch["steps_ids"], batch["answer_ids"]], axis=1)
  text_mask = jnp.concatenate([batch["steps_mask"], batch["answer_mask"]], axis=1)
  tp = thought_pass(model, batch["question_ids"], batch["question_mask"], n, text_ids,
                    text_mask)
  p = batch["question_ids"].shape[1]
  ce, n_tok = next_token_ce(model, tp.hidden, mask, labels, label_mask, p + n)
  total = cfg.ce_weight * ce
  return total, dict(total_loss=total, ce_loss=ce, n_tokens=n_tok,
                     n_latent=jnp.asarray(n, jnp.float32))


# ----------------------------------------------------------------------------
# Distill (CODI)
# ----------------------------------------------------------------------------
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


def distill_terms(model: CoLaRModel, batch: Batch, dcfg: DistillConfig) -> DistillTerms:
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
  embeds, mask, labels, label_mask = _concat_parts(
      batch, model, lm.embed_tokens(batch["steps_ids"]), batch["steps_mask"].astype(bool),
      batch["steps_ids"])
  t_out = lm(inputs_embeds=embeds, attention_mask=mask, logits=False, output_all_hidden=True)
  t_ce, t_n = next_token_ce(model, t_out.hidden, mask, labels, label_mask, p)

  tp = thought_pass(model, q_ids, q_mask, n, a_ids, a_mask, all_hidden=True)
  s_labels = jnp.concatenate([q_ids, jnp.zeros((b, n), q_ids.dtype), a_ids], 1)
  s_label_mask = jnp.concatenate([jnp.zeros((b, p + n), bool),
                                  a_mask & (jnp.arange(a)[None] > 0)], 1)
  s_ce, s_n = next_token_ce(model, tp.hidden, tp.mask, s_labels.astype(jnp.int32),
                            s_label_mask, p + n)

  teacher = _at(t_out.all_hidden, p + s + idx)
  student = _at(tp.text_all_hidden, idx)
  dist = hidden_distill_loss(student, teacher, dcfg.div_std)
  return DistillTerms(teacher_ce=t_ce, student_ce=s_ce, distill=dist, n_teacher=t_n,
                      n_student=s_n, teacher_hidden=jax.lax.stop_gradient(teacher),
                      student_hidden=student, thoughts=tp.thoughts)


def distill_loss(model: CoLaRModel, batch: Batch, key: jax.Array, *, c: int = 1,
                 cfg: LossConfig = LossConfig(), dcfg: DistillConfig = DistillConfig()
                 ) -> tuple[jax.Array, Metrics]:
  """alpha * teacher CE + beta * student CE + gamma * distillation (``LossConfig``'s
  CE weight is not used: alpha / beta are the CE weights of this method)."""
  del key, cfg
  _check_c("distill", c)
  t = distill_terms(model, batch, dcfg)
  total = dcfg.alpha * t.teacher_ce + dcfg.beta * t.student_ce + dcfg.gamma * t.distill
  return total, dict(total_loss=total, teacher_loss=t.teacher_ce, student_loss=t.student_ce,
                     distill_loss=t.distill, n_tokens=t.n_student,
                     n_latent=jnp.asarray(batch["latent_mask"].shape[1], jnp.float32))


def configure(dcfg: DistillConfig) -> None:
  """(Re-)registers ``distill`` with the run's weights (static: baked into the traced
  function). Call before ``train_state.compile_steps``."""
  register_loss("distill")(functools.partial(distill_loss, dcfg=dcfg))


configure(DistillConfig())
