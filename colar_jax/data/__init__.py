"""Data for colar_jax: datasets (tfds builders), prompts/tokenization, grain batches, answers.

Submodules (import what you need; the heavy ones load tfds/grain/transformers lazily):
  * :mod:`~colar_jax.data.records`  - :class:`Record`, :class:`DataFormatError`.
  * :mod:`~colar_jax.data.parsers`  - plain-Python source-format parsers.
  * :mod:`~colar_jax.data.synthetic` - the seeded synthetic chain task.
  * :mod:`~colar_jax.data.builders` - tfds builders, ``prepare`` / ``load_source``.
  * :mod:`~colar_jax.data.prompts`  - templates, tokenizers, numpy batch encoders.
  * :mod:`~colar_jax.data.pipeline` - grain training pipeline, speed draws, eval batches.
  * :mod:`~colar_jax.data.answers`  - ``extract_answer`` / ``is_correct``.

The names below are re-exported lazily so ``import colar_jax.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
  "Record": "records",
  "DataFormatError": "records",
  "SyntheticTask": "synthetic",
  "BUILDERS": "builders",
  "get_builder": "builders",
  "prepare": "builders",
  "load_source": "builders",
  "synthetic_config": "builders",
  "PromptTemplates": "prompts",
  "Buckets": "prompts",
  "Speed": "prompts",
  "EncodeStats": "prompts",
  "encode_sft_batch": "prompts",
  "encode_prompt_batch": "prompts",
  "load_tokenizer": "prompts",
  "train_char_tokenizer": "prompts",
  "char_tokenizer_corpus": "prompts",
  "separator_id": "prompts",
  "SpeedSampler": "pipeline",
  "TrainPipeline": "pipeline",
  "make_train_pipeline": "pipeline",
  "make_sft_encode_fn": "pipeline",
  "SftEncoder": "pipeline",
  "eval_batches": "pipeline",
  "EvalBatch": "pipeline",
  "extract_answer": "answers",
  "is_correct": "answers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
