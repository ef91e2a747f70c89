"""Answering questions with a method: prompts -> the jitted rollout -> decoded outputs.

Every method is decoded by the same rollout (:mod:`colar_jax.decode.rollout`); only the
prompt (``Method.prompt``) and the rollout settings (``Method.rollout_overrides``)
differ, and both come from the method's own file, so training and decoding can never
disagree.

Chain length #L: latent steps for latent methods; for token methods the generated
reasoning tokens (:func:`reasoning_length`). CoT's prompt ends with the separator, so its
output is ``chain ### Answer:..``; No-CoT's and iCoT's does not, so theirs opens with the
separator, ``### chain ### Answer:..`` (iCoT before its last stage) or ``### Answer:..``.
The reference's ``index(###) - 1`` subtracts one more token, a template artefact we do
not copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from colar_jax import methods
from colar_jax.data import answers as answer_lib
from colar_jax.data import prompts
from colar_jax.decode.rollout import RolloutConfig, rollout


@dataclasses.dataclass(frozen=True)
class Generation:
  """One decoded output: text (special tokens removed), chain length, token count."""

  text: str
  num_latent: int
  answer_length: int


# (questions, dataset indices, compression factor, seed) -> one Generation per question.
GenerateFn = Callable[[Sequence[str], Sequence[int], int, int], list[Generation]]


def reasoning_length(
  ids: Sequence[int],
  separator_id: int,
  *,
  opened: bool = True,
  is_answer: Callable[[Sequence[int]], bool] | None = None,
) -> int:
  """Reasoning tokens of a token method's output ``ids``.

  ``opened``: the prompt ended with the separator (CoT), so the output starts inside the
  chain. Otherwise (No-CoT, iCoT) the output's own leading separator opens it and is
  skipped. The chain is then what comes before the next separator; with none left, it
  is nothing when the rest is the answer (``is_answer(rest)``: ``### Answer:7`` from
  No-CoT) and all of it otherwise (a chain cut off before it reached the answer).
  """
  rest = list(ids)
  if not opened and rest[:1] == [separator_id]:
    rest = rest[1:]
  if separator_id in rest:
    return rest.index(separator_id)
  return 0 if is_answer is not None and is_answer(rest) else len(rest)


def method_rollout_config(
  base: RolloutConfig, method: str, run: Any, model_cfg: Any = None
) -> RolloutConfig:
  """The rollout that decodes ``method``: ``base`` plus the method's own overrides
  (latent mode, fixed number of thoughts, ``latent_proj`` when the model has one)."""
  proj = int(getattr(model_cfg, "latent_proj_size", 0) or 0)
  return base.replace(**methods.get(method).rollout_overrides(run, proj))


def batch_buckets(batch_size: int, n_devices: int = 1, choices: int = 4) -> tuple[int, ...]:
  """The batch shapes a decoder of at most ``batch_size`` rows per call compiles for:
  ``batch_size`` and its halvings, at most ``choices`` of them; when ``batch_size``
  splits over ``n_devices``, each is rounded up to a multiple of it (so every batch
  still splits over the devices).

  A short call (the last batch, or 20 questions at ``eval_batch_size=64``) pads to the
  smallest of them that holds it, instead of to ``batch_size``: at most ``choices``
  programs, and little work wasted on padding rows.
  """
  if batch_size < 1 or n_devices < 1 or choices < 1:
    raise ValueError(f"need batch_size, n_devices, choices >= 1: {batch_size, n_devices, choices}")
  unit = n_devices if batch_size % n_devices == 0 else 1
  out = set()
  b = int(batch_size)
  for _ in range(choices):
    out.add(-(-b // unit) * unit)
    if b == 1:
      break
    b = -(-b // 2)
  return tuple(sorted(out))


def make_generate_fn(
  model: Any,
  tokenizer: Any,
  method: str,
  rollout_cfg: RolloutConfig,
  *,
  batch_size: int,
  run: Any,
  templates: prompts.PromptTemplates | None = None,
  buckets: prompts.Buckets | None = None,
  bucket_choices: int = 1,
  fixed_prompt_length: bool = False,
) -> GenerateFn:
  """A GenerateFn decoding with the jitted rollout.

  The model is split ONCE here. A call's rows are padded to the smallest of
  :func:`batch_buckets` ``(batch_size, devices, bucket_choices)`` that holds them (the
  default, 1: always ``batch_size``, so the last, short batch reuses the same program),
  and prompts to the data's question buckets, or always to the largest with
  ``fixed_prompt_length`` (one program for every dataset and question; the thinking
  speed c is prompt text, so it never recompiles either). Dataset indices are the RNG
  row ids, so a question's sample does not depend on the batch it lands in.
  """
  spec = methods.get(method).prompt
  templates = templates or prompts.PromptTemplates()
  buckets = buckets or prompts.Buckets()
  cfg = method_rollout_config(rollout_cfg, method, run, getattr(model, "cfg", None))
  graphdef, state = nnx.split(model)
  shapes = batch_buckets(batch_size, jax.device_count(), bucket_choices)
  answer_prefix = templates.answer_prefix.strip()

  def is_answer(rest: Sequence[int]) -> bool:  # the text after a lone separator
    text = tokenizer.decode(list(rest), skip_special_tokens=True).lstrip()
    return bool(answer_prefix) and text.startswith(answer_prefix)

  def generate(
    questions: Sequence[str], indices: Sequence[int], factor: int, seed: int
  ) -> list[Generation]:
    enc = prompts.encode_prompt_batch(
      list(questions),
      tokenizer,
      templates,
      spec.speed_for(factor),
      buckets,
      append_separator=spec.separator,
      fixed_shapes=fixed_prompt_length,
    )
    out = rollout(
      graphdef,
      state,
      enc["question_ids"],
      enc["question_mask"],
      jax.random.key(seed),
      cfg,
      row_ids=np.asarray(indices, np.int32),
      batch_buckets=shapes,
    )
    ids, mask, n_lat = jax.device_get((out.answer_ids, out.answer_mask, out.num_latents))
    gens = []
    for i in range(len(questions)):
      row = ids[i][mask[i]].tolist()
      if cfg.latent_mode == "none":
        n = reasoning_length(row, cfg.separator_id, opened=spec.separator, is_answer=is_answer)
      else:
        n = int(n_lat[i])
      text = tokenizer.decode(row, skip_special_tokens=True)
      gens.append(Generation(text=text, num_latent=n, answer_length=len(row)))
    return gens

  return generate


@dataclasses.dataclass(frozen=True)
class Scored:
  """Per-question correctness and lengths of one (factor, seed) pass."""

  predictions: list[str]
  correct: np.ndarray  # [n] bool
  num_latent: np.ndarray  # [n]
  answer_length: np.ndarray  # [n]
  generations: list[Generation]


def answer_all(
  generate_fn: GenerateFn,
  questions: Sequence[str],
  answers: Sequence[str],
  *,
  factor: int,
  seed: int,
  batch_size: int,
  answer_prefix: str,
  answer_kind: str = "number",
  on_batch: Callable[[Sequence[Generation], np.ndarray], None] | None = None,
) -> Scored:
  """Decodes every question in batches of ``batch_size`` and checks each answer;
  ``on_batch(generations, correct)`` sees each batch once it is scored."""
  if len(questions) != len(answers):
    raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
  n = len(questions)
  gens: list[Generation] = []
  preds: list[Any] = []
  correct: list[bool] = []
  for s in range(0, n, batch_size):
    idx = list(range(s, min(s + batch_size, n)))
    batch = generate_fn([questions[i] for i in idx], idx, factor, seed)
    bp = [answer_lib.extract_answer(g.text, answer_prefix) for g in batch]
    bc = [bool(answer_lib.is_correct(p, answers[i], answer_kind)) for p, i in zip(bp, idx)]
    gens += batch
    preds += bp
    correct += bc
    if on_batch is not None:
      on_batch(batch, np.asarray(bc, bool))
  return Scored(
    predictions=preds,
    correct=np.asarray(correct, bool),
    num_latent=np.asarray([g.num_latent for g in gens], np.float64),
    answer_length=np.asarray([g.answer_length for g in gens], np.float64),
    generations=gens,
  )
