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

  DST/peft/adapter_config.json,                     (``--peft``, LoRA runs) the adapters
  DST/peft/adapter_model.safetensors                un-merged, PEFT format and key names
  DST/peft/base/                                    the frozen base LM (HF) they sit on

``AutoModelForCausalLM.from_pretrained(DST)`` gives the LM; ``colar_jax``'s ``eval`` and
``generate`` take ``--workdir DST`` and decode with the latent head as the run did
(``train.run.load_export``). ``PeftModel.from_pretrained(AutoModelForCausalLM
.from_pretrained(DST/peft/base), DST/peft)`` gives the same LM as the merged one.

A ``gs://`` (any non-local) ``DST`` is written to a local temporary dir first and then
copied up file by file (safetensors and transformers write local files only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import load, save_file

from colar_jax import paths
from colar_jax.weights import convert

COLAR_JSON = "colar.json"
COLAR_WEIGHTS = "colar.safetensors"
FORMAT_VERSION = 1
HEADS = ("latent_head", "latent_proj")
PEFT_DIR = "peft"
# Our projection -> its module path in HF Llama / Qwen2 (PEFT's ``target_modules`` names).
_HF_MODULE = {
  **{f"{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
  **{f"{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
}


def is_export(path: str) -> bool:
  return paths.is_file(paths.join(path, COLAR_JSON))


@contextlib.contextmanager
def _local(dst: str) -> Iterator[str]:
  """A local dir to write ``dst`` into: ``dst`` itself, or (a URL) a temporary dir whose
  files are copied to ``dst`` on success."""
  if paths.is_local(dst):
    yield dst
    return
  tmp = tempfile.mkdtemp(prefix="colar_export_")
  try:
    yield tmp
    for rel, full in paths.walk_files(tmp):
      target = paths.join(dst, rel)
      paths.makedirs(paths.parent(target))
      with open(full, "rb") as src, paths.path(target).open("wb") as out:
        shutil.copyfileobj(src, out, 64 << 20)  # streamed: shards are GBs
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def peft_adapter(decoder: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(PEFT tensors, adapter_config.json) of a LoRA decoder's un-merged adapters.

  PEFT names an adapter ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  ([r, in]) and ``...lora_B.weight`` ([out, r]) and computes ``x @ A.T @ B.T * alpha / r``;
  ours are ``lora_a`` [L, in, r] and ``lora_b`` [L, r, out] with ``x @ a @ b * alpha / r``,
  so A = a.T and B = b.T per layer. ``lora_dropout`` 0 and ``bias`` none, as trained.
  """
  cfg = decoder.cfg
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(decoder)))
  tensors: dict[str, np.ndarray] = {}
  targets = []
  for path, arr in flat.items():
    if path[-1] not in ("lora_a", "lora_b"):
      continue
    proj = path[-3]  # ("layers", "attn", "q_proj", "lora", "lora_a")
    targets.append(proj)
    host = np.asarray(jax.device_get(arr), np.float32)
    ab = "A" if path[-1] == "lora_a" else "B"
    for i in range(cfg.num_layers):
      name = f"base_model.model.model.layers.{i}.{_HF_MODULE[proj]}.lora_{ab}.weight"
      tensors[name] = np.ascontiguousarray(host[i].T)
  config = dict(
    peft_type="LORA",
    task_type="CAUSAL_LM",
    r=int(cfg.lora_rank),
    lora_alpha=float(cfg.lora_alpha),
    lora_dropout=0.0,
    bias="none",
    target_modules=sorted(set(targets)),
    fan_in_fan_out=False,
    use_rslora=False,
    inference_mode=True,
    init_lora_weights=True,
    modules_to_save=None,
    base_model_name_or_path="base",
  )
  return tensors, config


def _without_adapters(decoder: Any) -> Any:
  """A copy of a LoRA decoder whose adapters add nothing (``lora_b`` = 0): its export
  is the frozen base."""
  graphdef, state = nnx.split(decoder)
  pure = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  pure = {k: (np.zeros(v.shape, v.dtype) if k[-1] == "lora_b" else v) for k, v in pure.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
  return nnx.merge(graphdef, state)


def export_peft(
  decoder: Any, dst: str, *, tokenizer_dir: str, dtype: Any = None, final: str | None = None
) -> list[str]:
  """``dst/adapter_config.json`` + ``adapter_model.safetensors`` (the un-merged adapters)
  and ``dst/base/`` (the frozen base LM, HF format; ``final``: where ``dst`` ends up, for
  the config's ``base_model_name_or_path``). Returns the files written."""
  if decoder.cfg.lora_rank <= 0:
    raise ValueError("--peft: the run has no LoRA adapters (model.lora_rank = 0)")
  tensors, config = peft_adapter(decoder)
  base = paths.join(dst, "base")
  convert.export_hf(_without_adapters(decoder), base, tokenizer_src=tokenizer_dir, dtype=dtype)
  config["base_model_name_or_path"] = paths.join(paths.absolute(final or dst), "base")
  if jax.process_index() == 0:
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
  return ["adapter_config.json", "adapter_model.safetensors", "base/"]


def export_model(
  model: Any,
  dst: str,
  *,
  tokenizer_dir: str,
  info: dict[str, Any],
  dtype: Any = None,
  peft: bool = False,
) -> dict[str, Any]:
  """Writes ``model`` (a ``CoLaRModel``) to ``dst``; ``info`` goes into ``colar.json``.

  The LM is written by ``convert.export_hf`` (LoRA merged, ``dtype`` or the stored one);
  the heads stay float32 (their log-probs feed the GRPO ratio). ``peft``: also the
  un-merged adapters and their base under ``dst/peft`` (:func:`export_peft`).
  """
  with _local(dst) as out:
    summary = _export(
      model, out, tokenizer_dir=tokenizer_dir, info=info, dtype=dtype, peft=peft, final=dst
    )
  return dict(summary, dst=paths.absolute(dst))


def _export(
  model: Any,
  dst: str,
  *,
  tokenizer_dir: str,
  info: dict[str, Any],
  dtype: Any,
  peft: bool,
  final: str,
) -> dict[str, Any]:
  extra = {}
  if peft:
    peft_dst = os.path.join(dst, PEFT_DIR)
    os.makedirs(peft_dst, exist_ok=True)
    extra["peft"] = export_peft(
      model.lm,
      peft_dst,
      tokenizer_dir=tokenizer_dir,
      dtype=dtype,
      final=paths.join(final, PEFT_DIR),
    )
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
  return dict(dst=dst, lm_files=files, heads=sorted(heads), **extra)


def read_parts(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """(colar.json, {head name: pure parameter dict}) of an export."""
  info = json.loads(paths.read_text(paths.join(path, COLAR_JSON)))
  if int(info.get("format_version", 0)) != FORMAT_VERSION:
    raise ValueError(
      f"{path}/{COLAR_JSON}: format_version {info.get('format_version')!r}, "
      f"this version reads {FORMAT_VERSION}"
    )
  flat = load(paths.path(paths.join(path, COLAR_WEIGHTS)).read_bytes())
  heads: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  for key, arr in flat.items():
    name, *rest = key.split("/")
    heads.setdefault(name, {})[tuple(rest)] = arr
  return info, {k: traverse_util.unflatten_dict(v) for k, v in heads.items()}
