"""The batch encoder the baselines share (No-CoT, iCoT, Coconut, Distill).

Every batch has the keys of ``data.prompts.encode_sft_batch`` (question / steps / answer
ids + masks, ``speed``, ``compression_factor``), so the shared train step, bucketing and
sharding treat it like any other; what a method changes is WHAT is encoded:

* the question part is exactly the method's decoding prompt (``Method.prompt``: speed
  suffix or none, trailing separator or not), tokenized as ``encode_prompt_batch`` does
  (the separator its own id, ``prompts.encode_with_separator``), so training and
  decoding see the same ids; a prompt that should end with the separator is checked to;
* the steps part holds what is left of the chain after a curriculum removed the first
  steps (iCoT) or turned them into thoughts (Coconut). When the prompt already ends with
  the separator the steps follow it directly; otherwise they are preceded by one
  (``###s3\\ns4``). A row with nothing left has an empty chain, and when the stage
  removes every step the part has ZERO columns for every row, decided by the stage and
  not the data so that hosts encoding different rows still agree on shapes;
* extras: ``latent_mask`` [B, N] (N continuous thoughts; a static shape is how the
  jitted loss learns N, so it compiles once per (bucket, stage)), ``stage`` [B] and
  ``answer_pred_index`` [B] (Distill: the answer-part column whose output predicts the
  first answer-content token, i.e. the ``:`` of ``###Answer:``).

``speed`` holds -1 when the prompt has no speed suffix (0 = ``auto`` as elsewhere).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from colar_jax.data.prompts import (
  EncodeStats,
  PromptTemplates,
  Speed,
  check_ends_with_separator,
  encode_with_separator,
  pad_batch,
)
from colar_jax.data.records import Record
from colar_jax.methods.base import EncodeContext, PromptSpec
from colar_jax.methods.curriculum import is_final, steps_removed

log = logging.getLogger(__name__)


def chain_text(templates: PromptTemplates, steps: Sequence[str], opened: bool) -> str:
  """Text of the (remaining) chain. ``opened``: the previous token is the separator."""
  if not steps:
    return ""
  if opened:
    return templates.steps.format(templates.step_joiner.join(steps))
  return templates.steps_text(steps)


def answer_pred_index(answer_tokens: Sequence[Sequence[int]], prefix: Sequence[int]) -> np.ndarray:
  """Per row, the answer-part column whose output predicts the first token that is not
  part of ``prefix`` (the tokens of ``###Answer:``): the last matching prefix token.

  Computed on the real tokens instead of a fixed offset (the reference hard-codes
  "+1", which assumes ``Answer`` and ``:`` are one token each and the answer does not
  merge with the ``:``).
  """
  out = np.zeros((len(answer_tokens),), np.int32)
  for i, row in enumerate(answer_tokens):
    n = 0
    while n < min(len(row) - 1, len(prefix)) and row[n] == prefix[n]:
      n += 1
    if n == 0:
      raise ValueError(
        "answer part does not start with the thinking separator; "
        f"tokens {list(row[:8])} vs prefix {list(prefix)}"
      )
    out[i] = n - 1
  return out


def _pad(
  seqs: list[list[int]],
  buckets: Sequence[int],
  pad_id: int,
  *,
  pad_left: bool,
  keep_end: bool,
  fixed: bool,
  part: str,
  stats: EncodeStats | None,
) -> tuple[np.ndarray, np.ndarray]:
  ids, mask, truncated = pad_batch(
    seqs, buckets, pad_id, pad_left=pad_left, keep_end=keep_end, fixed_shape=fixed
  )
  if truncated:
    log.warning(
      "%d %s rows longer than the largest bucket (%d) were truncated", truncated, part, buckets[-1]
    )
  if stats is not None:
    stats.truncated[part] += truncated
  return ids, mask


def encode_staged(
  records: Sequence[Record],
  ctx: EncodeContext,
  *,
  prompt: PromptSpec,
  kept: Sequence[Sequence[str]],
  all_gone: bool,
  opened: bool,
  stage: int,
  n_latents: int | None = None,
  answer_pred: bool = False,
) -> dict[str, np.ndarray]:
  """One baseline batch: ``kept[i]`` are the steps of row i left as text, ``all_gone``
  gives the steps part zero columns, ``opened``: the steps follow a separator already
  in the text, ``n_latents``: add a ``latent_mask`` of that many thoughts."""
  tok, templates, buckets = ctx.tokenizer, ctx.templates, ctx.buckets
  n = len(records)
  pad_id, eos_id = int(tok.pad_token_id), int(tok.eos_token_id)
  sep = templates.separator if prompt.separator else ""
  q_texts = [templates.question_text(r.question, prompt.speed) + sep for r in records]
  s_texts = [chain_text(templates, k, opened) for k in kept]
  a_texts = [templates.answer_text(r.answer) for r in records]
  tokens, sep_id = encode_with_separator(tok, q_texts + s_texts + a_texts, templates.separator)
  q_tok, s_tok = tokens[:n], tokens[n : 2 * n]
  if prompt.separator:
    check_ends_with_separator(q_tok, sep_id, tok)
  a_tok = [t + [eos_id] for t in tokens[2 * n :]]
  kw = dict(fixed=ctx.fixed_shapes, stats=ctx.stats)
  q_ids, q_mask = _pad(
    q_tok, buckets.question, pad_id, pad_left=True, keep_end=True, part="question", **kw
  )
  if all_gone:
    s_ids, s_mask = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int32)
  else:
    s_ids, s_mask = _pad(
      s_tok, buckets.steps, pad_id, pad_left=True, keep_end=False, part="steps", **kw
    )
  a_ids, a_mask = _pad(
    a_tok, buckets.answer, pad_id, pad_left=False, keep_end=False, part="answer", **kw
  )
  if ctx.stats is not None:
    ctx.stats.rows += n
  speed = -1 if prompt.speed is None else Speed.of(prompt.speed).code
  batch = {
    "question_ids": q_ids,
    "question_mask": q_mask,
    "steps_ids": s_ids,
    "steps_mask": s_mask,
    "answer_ids": a_ids,
    "answer_mask": a_mask,
    "speed": np.full((n,), speed, np.int32),
    "compression_factor": np.ones((n,), np.int32),
    "stage": np.full((n,), stage, np.int32),
  }
  if n_latents is not None:
    batch["latent_mask"] = np.ones((n, n_latents), np.int32)
  if answer_pred:
    prefix = encode_with_separator(
      tok, [templates.separator + templates.answer_prefix], templates.separator
    )[0][0]
    batch["answer_pred_index"] = answer_pred_index(a_tok, prefix)
  return batch


def encode_curriculum(
  records: Sequence[Record],
  ctx: EncodeContext,
  *,
  prompt: PromptSpec,
  cur: Any,
  stage: int,
  n_latents: int | None = None,
) -> dict[str, np.ndarray]:
  """A batch at ``stage`` of the curriculum ``cur`` (a ``config.Curriculum``): the first
  steps it removes are gone (iCoT) or replaced by ``n_latents`` thoughts (Coconut). The
  remaining steps start with their own separator (after the prompt, or the thoughts)."""
  kept = [tuple(r.steps[steps_removed(cur, stage, len(r.steps)) :]) for r in records]
  return encode_staged(
    records,
    ctx,
    prompt=prompt,
    kept=kept,
    all_gone=is_final(cur, stage),
    opened=False,
    stage=stage,
    n_latents=n_latents,
  )
