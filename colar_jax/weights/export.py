"""A trained run as a directory that Hugging Face ``transformers`` loads, plus its CoLaR parts.

Layout of an export (``python -m colar_jax export --workdir RUN DST``)::

  DST/config.json, model.safetensors[.index.json]   the LM (LoRA adapters merged), HF format
  DST/tokenizer.json, ...                           the run's tokenizer files
  DST/colar.safetensors                             latent head (and latent projection)
                                                    parameters, named ``latent_head/fc1/kernel``
                                                    (flax layout: kernels are [in, out])
  DST/colar.json                                    what the LM alone does not say: format
                                                    version, method, embed_std, the prompt
                                                    templates, the trained compression factors,
                                                    the latent head's width, the source run
                                                    and step, and the run's whole config

``AutoModelForCausalLM.from_pretrained(DST)`` gives the LM; ``colar_jax``'s ``eval`` and
``generate`` take ``--workdir DST`` and decode with the latent head as the run did
(``train.run.load_export``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from colar_jax.weights import convert

COLAR_JSON = "colar.json"
COLAR_WEIGHTS = "colar.safetensors"
FORMAT_VERSION = 1
HEADS = ("latent_head", "latent_proj")


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, COLAR_JSON))


def export_model(
  model: Any, dst: str, *, tokenizer_dir: str, info: dict[str, Any], dtype: Any = None
) -> dict[str, Any]:
  """Writes ``model`` (a ``CoLaRModel``) to ``dst``; ``info`` goes into ``colar.json``.

  The LM is written by ``convert.export_hf`` (LoRA merged, ``dtype`` or the stored one);
  the heads stay float32 (their log-probs feed the GRPO ratio).
  """
  files = convert.export_hf(model.lm, dst, tokenizer_src=tokenizer_dir, dtype=dtype)
  heads: dict[str, np.ndarray] = {}
  for name in HEADS:
    module = getattr(model, name, None)
    if module is None:
      continue
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module)))
    for path, arr in flat.items():
      heads["/".join((name, *map(str, path)))] = np.asarray(arr, np.float32)
  save_file(heads, os.path.join(dst, COLAR_WEIGHTS))
  body = dict(format_version=FORMAT_VERSION, **info)
  with open(os.path.join(dst, COLAR_JSON), "w") as f:
    json.dump(body, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  return dict(dst=os.path.abspath(dst), lm_files=files, heads=sorted(heads))


def read_parts(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """(colar.json, {head name: pure parameter dict}) of an export."""
  with open(os.path.join(path, COLAR_JSON)) as f:
    info = json.load(f)
  if int(info.get("format_version", 0)) != FORMAT_VERSION:
    raise ValueError(
      f"{path}/{COLAR_JSON}: format_version {info.get('format_version')!r}, "
      f"this version reads {FORMAT_VERSION}"
    )
  flat = load_file(os.path.join(path, COLAR_WEIGHTS))
  heads: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  for key, arr in flat.items():
    name, *rest = key.split("/")
    heads.setdefault(name, {})[tuple(rest)] = arr
  return info, {k: traverse_util.unflatten_dict(v) for k, v in heads.items()}
