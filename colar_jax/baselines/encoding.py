"""Numpy batch encoders of the baselines (pluggable ``encode_fn`` of the grain pipeline).

Every batch has the ``encode_sft_batch`` keys (question / steps / answer ids + masks,
``speed``, ``compression_factor``) so the shared train step, bucketing and sharding
treat it like any other; what changes per method is WHAT is encoded:

* the question part is exactly the evaluation prompt of the method
  (``evaluate.METHOD_SPECS``: speed suffix or none, trailing separator or not), tokenized
  as one string like ``encode_prompt_batch`` does, so training and decoding see the
  same ids;
* the steps part holds what is left of the chain after the curriculum removed the
  first steps (iCoT) or turned them into thoughts (Coconut). When the prompt already
  ends with the separator the steps follow it directly; otherwise they are preceded
  by one (``###s3\\ns4``). A row with nothing left has an empty chain, and when the
  stage removes every step (No-CoT, final iCoT / Coconut stage) the part has ZERO
  columns for every row, decided by the stage and not the data so that hosts encoding
  different rows still agree on shapes;
* extras: ``latent_mask`` [B, N] (Coconut / Distill: N continuous thoughts; a static
  shape is how the jitted loss learns N, so it compiles once per (bucket, stage)),
  ``stage`` [B] and ``answer_pred_index`` [B] (Distill: column of the answer part whose
  output predicts the first answer-content token, i.e. the ``:`` of ``###Answer:``).

``speed`` holds -1 when the prompt has no speed suffix (0 = ``auto`` as elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from colar_jax.baselines.schedule import BASELINE_METHODS, BaselineConfig
from colar_jax.data.prompts import (Buckets, EncodeStats, PromptTemplates, Speed,
                                    encode_texts, pad_batch)
from colar_jax.data.records import Record

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """The evaluation prompt of a method: speed suffix (None = none) + trailing separator."""

  speed: int | str | None
  separator: bool


def prompt_spec(method: str) -> PromptSpec:
  """Read from ``evaluate.METHOD_SPECS``: one source of truth for train and eval prompts."""
  from colar_jax.evaluate import METHOD_SPECS

  spec = METHOD_SPECS[method]
  if spec.uses_factor:
    raise ValueError(f"{method}: a baseline prompt cannot depend on the compression factor")
  return PromptSpec(speed=spec.speed, separator=bool(spec.prompt_separator))


def chain_text(templates: PromptTemplates, steps: Sequence[str], opened: bool) -> str:
  """Text of the (remaining) chain. ``opened``: the previous token is the separator."""
  if opened:
    return templates.steps.format(templates.step_joiner.join(steps)) if steps else ""
  return templates.steps_text(steps) if steps else ""


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
      raise ValueError("answer part does not start with the thinking separator; "
                       f"tokens {list(row[:8])} vs prefix {list(prefix)}")
    out[i] = n - 1
  return out


def _speed_code(speed: int | str | None) -> int:
  return -1 if speed is None else Speed.of(speed).code


def _pad(seqs: list[list[int]], buckets: Sequence[int], pad_id: int, *, pad_left: bool,
         keep_end: bool, fixed: bool, part: str, stats: EncodeStats | None
         ) -> tuple[np.ndarray, np.ndarray]:
  ids, mask, truncated = pad_batch(seqs, buckets, pad_id, pad_left=pad_left,
                                   keep_end=keep_end, fixed_shape=fixed)
  if truncated:
    log.warning("%d %s rows longer than the largest bucket (%d) were truncated",
                truncated, part, buckets[-1])
  if stats is not None:
    stats.truncated[part] += truncated
  return ids, mask


def encode_baseline_batch(records: Sequence[Record], tokenizer: Any,
                          templates: PromptTemplates, buckets: Buckets, *, method: str,
                          stage: int, config: BaselineConfig = BaselineConfig(),
                          stats: EncodeStats | None = None,
                          fixed_shapes: bool = False) -> dict[str, np.ndarray]:
  """One batch of ``method`` at curriculum ``stage`` (see the module doc)."""
  if method not in BASELINE_METHODS:
    raise ValueError(f"unknown baseline {method!r}; known: {BASELINE_METHODS}")
  spec = prompt_spec(method)
  if method in ("coconut", "distill") and not spec.separator:
    raise ValueError(f"{method}: thoughts follow the separator; its prompt must end with it")
  n = len(records)
  pad_id, eos_id = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
  sep = templates.separator if spec.separator else ""
  q_texts = [templates.question_text(r.question, spec.speed) + sep for r in records]
  n_latents = 0
  if method == "nocot":
    all_gone, kept = True, [() for _ in records]
  elif method == "distill":  # the teacher reads the whole chain
    all_gone, kept, n_latents = False, [tuple(r.steps) for r in records], config.distill.n_latents
  else:
    sched = config.icot if method == "icot" else config.coconut.schedule
    all_gone = sched.is_final(stage)
    kept = [tuple(r.steps[sched.steps_removed(stage, len(r.steps)):]) for r in records]
    if method == "coconut":
      n_latents = config.coconut.n_latents(stage)
  # After Coconut's thoughts the text restarts with a separator (end of thinking).
  opened = spec.separator and method != "coconut"
  s_texts = [chain_text(templates, k, opened) for k in kept]
  a_texts = [templates.answer_text(r.answer) for r in records]
  tokens = encode_texts(tokenizer, q_texts + s_texts + a_texts)
  q_tok, s_tok = tokens[:n], tokens[n:2 * n]
  a_tok = [t + [eos_id] for t in tokens[2 * n:]]
  q_ids, q_mask = _pad(q_tok, buckets.question, pad_id, pad_left=True, keep_end=True,
                       fixed=fixed_shapes, part="question", stats=stats)
  if all_gone:
    s_ids, s_mask = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int32)
  else:
    s_ids, s_mask = _pad(s_tok, buckets.steps, pad_id, pad_left=True, keep_end=False,
                         fixed=fixed_shapes, part="steps", stats=stats)
  a_ids, a_mask = _pad(a_tok, buckets.answer, pad_id, pad_left=False, keep_end=False,
                       fixed=fixed_shapes, part="answer", stats=stats)
  if stats is not None:
    stats.rows += n
  batch = {
      "question_ids": q_ids, "question_mask": q_mask,
      "steps_ids": s_ids, "steps_mask": s_mask,
      "answer_ids": a_ids, "answer_mask": a_mask,
      "speed": np.full((n,), _speed_code(spec.speed), np.int32),
      "compression_factor": np.ones((n,), np.int32),
      "stage": np.full((n,), stage, np.int32),
  }
  if method in ("coconut", "distill"):
    batch["latent_mask"] = np.ones((n, n_latents), np.int32)
  if method == "distill":
    prefix = encode_texts(tokenizer, [templates.separator + templates.answer_prefix])[0]
    batch["answer_pred_index"] = answer_pred_index(a_tok, prefix)
  return batch


@dataclasses.dataclass(frozen=True)
class BaselineEncoder:
  """``encode_fn(records, speed, epoch)`` of a baseline: the stage comes from the epoch.

  The drawn speed is ignored (each baseline has one fixed prompt). A picklable class,
  not a closure, like ``SftEncoder``, for grain's multiprocessing prefetch.
  """

  method: str
  tokenizer: Any
  templates: PromptTemplates
  buckets: Buckets
  config: BaselineConfig = BaselineConfig()
  fixed_shapes: bool = False
  stats: EncodeStats | None = None

  def __post_init__(self) -> None:
    if self.method not in BASELINE_METHODS:
      raise ValueError(f"unknown baseline {self.method!r}; known: {BASELINE_METHODS}")

  def stage(self, epoch: int) -> int:
    return self.config.stage(self.method, epoch)

  def __call__(self, records: list[Record], speed: Speed, epoch: int) -> dict[str, np.ndarray]:
    del speed
    return encode_baseline_batch(records, self.tokenizer, self.templates, self.buckets,
                                 method=self.method, stage=self.stage(epoch),
                                 config=self.config, stats=self.stats,
                                 fixed_shapes=self.fixed_shapes)
