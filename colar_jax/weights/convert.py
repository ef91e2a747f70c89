"""HF / GGUF checkpoints <-> the converted Orbax directory every run loads.

CLI::

  python -m colar_jax convert hf-to-orbax SRC DST [--param_dtype auto] [--mesh fsdp=-1]
  python -m colar_jax convert orbax-to-hf SRC DST [--dtype bfloat16]

``SRC`` of ``hf-to-orbax`` is an HF model directory (``model.safetensors``, a
sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``) or a
llama.cpp ``.gguf`` file (dequantized to float32; see ``weights/readers.py``).

Converted directory layout (what ``config.model.hf_dir`` points at)::

  DST/config.json        HF-style architecture (``ModelConfig.to_hf_dict()``), so
                         ``ModelConfig.from_hf_dir`` and HF tools read it alike.
  DST/<tokenizer files>  copied from the source, or built from GGUF metadata.
  DST/embed_std.json     {"embed_std": float}: std of the input-embedding matrix.
                         CoLaR predicts embeddings / embed_std; the reference code
                         hard-codes the value per model name, we measure it once
                         here (config ``model.embed_std >= 0`` overrides it).
  DST/params/            Orbax StandardCheckpointer of
                         ``nnx.to_pure_dict(nnx.state(decoder))``:
      embed/embedding                   [V, D]
      layers/{input_norm,post_attn_norm}/scale      [L, D]
      layers/attn/{q,k,v}_proj/kernel   [L, D, heads*hd]   (+ bias [L, heads*hd])
      layers/attn/o_proj/kernel         [L, H*hd, D]
      layers/mlp/{gate,up}_proj/kernel  [L, D, F];  layers/mlp/down_proj/kernel [L, F, D]
      final_norm/scale                  [D]
      lm_head/kernel                    [D, V]   (untied embeddings only)
    Kernels are [in, out] (HF Linear weights transposed); L is the scanned
    layer axis. A LoRA decoder stores ``.../q_proj/base/kernel`` plus
    ``.../q_proj/lora/lora_{a,b}``; loading maps ``base`` to and from plain
    kernels, so a base checkpoint loads into a LoRA model (adapters at init).

Loading never holds more than one parameter on the host besides the model
itself: the model is built abstractly (``nnx.eval_shape``), each parameter's
``NamedSharding`` comes from its logical axis names, and each stacked
parameter is assembled from its L per-layer tensors and placed with
``jax.make_array_from_callback`` before the next one is read.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from colar_jax import config as cfglib
from colar_jax import paths
from colar_jax.model import Decoder, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.weights.readers import GGUFSource, TensorSource, copy_tokenizer_files, open_source

Path = tuple[str, ...]
PARAMS_DIR, EMBED_STD_FILE = "params", "embed_std.json"

# Our canonical parameter path (LoRA ``base`` dropped) -> (HF name, transpose).
_TOP: dict[Path, tuple[str, bool]] = {
  ("embed", "embedding"): ("model.embed_tokens.weight", False),
  ("final_norm", "scale"): ("model.norm.weight", False),
  ("lm_head", "kernel"): ("lm_head.weight", True),
}
_LAYER: dict[Path, tuple[str, bool]] = {
  ("input_norm", "scale"): ("input_layernorm.weight", False),
  ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", False),
}
for _mod, _projs in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
  for _p in _projs:
    _hf = f"{'self_attn' if _mod == 'attn' else 'mlp'}.{_p}_proj"
    _LAYER[(_mod, f"{_p}_proj", "kernel")] = (f"{_hf}.weight", True)
    _LAYER[(_mod, f"{_p}_proj", "bias")] = (f"{_hf}.bias", False)

# Checkpoint tensors that carry no information for us (recomputed buffers).
_IGNORABLE = ("rotary_emb.inv_freq",)


def _canonical(path: Path) -> Path:
  return tuple(p for p in path if p != "base")


def _pstr(path: Path) -> str:
  return "lm/" + "/".join(path)


def hf_names(path: Path, num_layers: int) -> tuple[list[str], bool] | None:
  """HF tensor names of one of our params (L names if stacked) and whether the
  HF tensor is the transpose; None for params with no HF counterpart (LoRA)."""
  path = _canonical(path)
  if "lora" in path:
    return None
  if path in _TOP:
    name, tr = _TOP[path]
    return [name], tr
  if path[0] == "layers" and path[1:] in _LAYER:
    name, tr = _LAYER[path[1:]]
    return [f"model.layers.{i}.{name}" for i in range(num_layers)], tr
  raise KeyError(f"{_pstr(path)}: no HF mapping for this parameter")


def default_mesh() -> Mesh:
  """One device: what a single-host conversion or test uses without a mesh."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)


def _abstract(cfg: ModelConfig, mesh: Mesh | None, rules: Any):
  """Abstract decoder, its graphdef/state and flat {path: shape} / {path: sharding}."""
  mesh = mesh if mesh is not None else default_mesh()
  rules = rules if rules is not None else shd.DEFAULT_RULES
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  shapes = traverse_util.flatten_dict(nnx.to_pure_dict(abs_state))
  shards = traverse_util.flatten_dict(nnx.to_pure_dict(shd.state_shardings(abs_state, mesh, rules)))
  return graphdef, abs_state, shapes, shards


def _init_subset(
  cfg: ModelConfig, paths: list[Path], shards: dict[Path, NamedSharding], seed: int
) -> dict[Path, jax.Array]:
  """Initialises only ``paths`` (e.g. LoRA adapters), each into its sharding.

  The whole decoder init is traced, but only the requested leaves are outputs,
  so XLA drops the rest of the work and never allocates the other weights.
  """
  if not paths:
    return {}
  keys = {"/".join(p): p for p in paths}

  def init():
    flat = traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed))))
    )
    return {k: flat[p] for k, p in keys.items()}

  out = jax.jit(init, out_shardings={k: shards[p] for k, p in keys.items()})()
  return {p: out[k] for k, p in keys.items()}


def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Host array -> global array; each device takes only its own slice."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _merge(graphdef, abs_state, leaves: dict[Path, jax.Array]) -> Decoder:
  nnx.replace_by_pure_dict(abs_state, traverse_util.unflatten_dict(leaves))
  return nnx.merge(graphdef, abs_state)


def _shape_error(path: Path, what: str, got: tuple, want: tuple) -> ValueError:
  return ValueError(
    f"shape mismatch for {_pstr(path)}{what}: checkpoint has "
    f"{tuple(got)} but the config expects {tuple(want)}"
  )


def load_hf_into_model(
  src: str | TensorSource,
  cfg: ModelConfig | None = None,
  mesh: Mesh | None = None,
  rules: Any = None,
  *,
  seed: int = 0,
  **overrides: Any,
) -> Decoder:
  """Reads an HF dir / GGUF straight into a (sharded) Decoder, param by param.

  ``cfg`` defaults to the source's config.json (``overrides`` are applied on
  top, e.g. ``param_dtype="bfloat16"``, ``lora_rank=8``). Params without an
  HF counterpart (LoRA adapters) are initialised as the model would.
  """
  source = open_source(src) if isinstance(src, str) else src
  if cfg is None:
    cfg = ModelConfig.from_hf_dict(source.hf_config(), **overrides)
  elif overrides:
    cfg = cfg.replace(**overrides)
  graphdef, abs_state, shapes, shards = _abstract(cfg, mesh, rules)
  available = set(source.names())
  leaves: dict[Path, jax.Array] = {}
  used: set[str] = set()
  to_init: list[Path] = []
  for path, sds in shapes.items():
    spec = hf_names(path, cfg.num_layers)
    if spec is None:
      to_init.append(path)
      continue
    names, transpose = spec
    stacked = path[0] == "layers"
    want = tuple(sds.shape[1:] if stacked else sds.shape)
    want = want[::-1] if transpose else want  # compare in the HF layout
    for n in names:
      if n not in available:
        raise KeyError(f"{source.description}: missing tensor {n} for {_pstr(path)}")
      if source.shape(n) != want:
        raise _shape_error(path, f" (HF {n})", source.shape(n), want)
    host = np.empty(sds.shape, sds.dtype)
    for i, n in enumerate(names):
      w = source.get(n)
      w = w.T if transpose else w
      if stacked:
        host[i] = w
      else:
        host[...] = w
    leaves[path] = _place(host, shards[path])
    del host
    used.update(names)
  leaves.update(_init_subset(cfg, to_init, shards, seed))
  unused = [
    n
    for n in available - used
    if not n.endswith(_IGNORABLE) and not (cfg.tie_embeddings and n == "lm_head.weight")
  ]
  if unused:
    logging.warning(
      "%s: %d tensors not used, e.g. %s", source.description, len(unused), sorted(unused)[:5]
    )
  return _merge(graphdef, abs_state, leaves)


def compute_embed_std(decoder: Decoder) -> float:
  """Std of the input-embedding matrix (float32, computed where it is sharded)."""
  return float(jax.jit(lambda e: jnp.std(e.astype(jnp.float32)))(decoder.embed.embedding[...]))


def read_embed_std(path: str) -> float | None:
  """``embed_std`` of a converted dir, or None if it has no embed_std.json."""
  p = paths.join(path, EMBED_STD_FILE)
  if not paths.is_file(p):
    return None
  return float(json.loads(paths.read_text(p))["embed_std"])


def _write_hf_config(cfg: ModelConfig, dst: str, dtype: Any) -> None:
  d = cfg.to_hf_dict()
  d["torch_dtype"] = d["dtype"] = jnp.dtype(dtype).name
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)


def _save_tokenizer(tokenizer_src: str | TensorSource | None, dst: str) -> list[str]:
  if tokenizer_src is None:
    return []
  if not isinstance(tokenizer_src, str):
    return tokenizer_src.save_tokenizer(dst)
  if tokenizer_src.endswith(".gguf"):
    return GGUFSource(tokenizer_src).save_tokenizer(dst)
  return copy_tokenizer_files(tokenizer_src, dst)


def save_orbax_dir(
  decoder: Decoder,
  tokenizer_src: str | TensorSource | None,
  dst: str,
  *,
  embed_std: float | None = None,
) -> float:
  """Writes the converted dir (layout in the module docstring); returns embed_std.

  Every process must call this (the Orbax save and the std are collective).
  """
  dst = os.path.abspath(dst)
  os.makedirs(dst, exist_ok=True)
  std = compute_embed_std(decoder) if embed_std is None else float(embed_std)
  if jax.process_index() == 0:
    _write_hf_config(decoder.cfg, dst, decoder.cfg.params_dtype)
    _save_tokenizer(tokenizer_src, dst)
    with open(os.path.join(dst, EMBED_STD_FILE), "w") as f:
      json.dump({"embed_std": std}, f)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(dst, PARAMS_DIR), nnx.to_pure_dict(nnx.state(decoder)), force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  return std


def load_orbax_dir(
  path: str, *, mesh: Mesh | None = None, rules: Any = None, seed: int = 0, **cfg_overrides: Any
) -> tuple[ModelConfig, Decoder]:
  """Restores a converted dir directly into the target sharding.

  ``cfg_overrides`` are ModelConfig fields (dtypes, lora_rank, remat ...);
  the stored arrays are cast to ``param_dtype`` on restore.
  """
  path = paths.absolute(path)
  cfg = ModelConfig.from_hf_dir(path, **cfg_overrides)
  graphdef, abs_state, shapes, shards = _abstract(cfg, mesh, rules)
  params = os.path.join(path, PARAMS_DIR)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(params)
  meta = getattr(meta, "item_metadata", meta)
  meta = traverse_util.flatten_dict(getattr(meta, "tree", meta))
  by_canonical = {_canonical(k): k for k in meta if "lora" not in k}
  plan: dict[Path, Path] = {}
  target: dict[Path, jax.ShapeDtypeStruct] = {}
  to_init: list[Path] = []
  for p, sds in shapes.items():
    k = p if p in meta else (None if "lora" in p else by_canonical.get(_canonical(p)))
    if k is None:
      if "lora" in p:
        to_init.append(p)
        continue
      raise ValueError(
        f"{params}: no parameter {_pstr(p)} (the config expects shape {tuple(sds.shape)})"
      )
    if tuple(meta[k].shape) != tuple(sds.shape):
      raise _shape_error(p, "", meta[k].shape, sds.shape)
    plan[p] = k
    target[k] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=shards[p])
  extra = sorted("/".join(k) for k in set(meta) - set(plan.values()))
  if extra:
    hint = (
      " (LoRA adapters: load with lora_rank > 0 and their lora_targets)"
      if any("lora" in e for e in extra)
      else ""
    )
    raise ValueError(
      f"{params}: parameters not in the configured model{hint}: "
      f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}"
    )
  restored = traverse_util.flatten_dict(ckptr.restore(params, traverse_util.unflatten_dict(target)))
  ckptr.close()
  leaves = {p: restored[k] for p, k in plan.items()}
  leaves.update(_init_subset(cfg, to_init, shards, seed))
  return cfg, _merge(graphdef, abs_state, leaves)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _ShardWriter:
  """Streams tensors into safetensors files of at most ``max_bytes`` each."""

  def __init__(self, dst: str, max_bytes: int):
    self.dst, self.max_bytes = dst, max_bytes
    self.n_files = 0
    self.pending: dict[str, np.ndarray] = {}
    self.size = 0
    self.weight_map: dict[str, int] = {}

  def add(self, name: str, t: np.ndarray) -> None:
    if self.pending and self.size + t.nbytes > self.max_bytes:
      self._flush()
    self.pending[name] = np.ascontiguousarray(t)
    self.size += t.nbytes
    self.weight_map[name] = self.n_files

  def _flush(self) -> None:
    save_file(
      self.pending, os.path.join(self.dst, f".shard{self.n_files}.tmp"), metadata={"format": "pt"}
    )
    self.n_files += 1
    self.pending, self.size = {}, 0

  def finish(self) -> list[str]:
    if self.pending:
      self._flush()
    n = self.n_files
    names = (
      ["model.safetensors"]
      if n == 1
      else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for i, name in enumerate(names):
      os.replace(os.path.join(self.dst, f".shard{i}.tmp"), os.path.join(self.dst, name))
    if n > 1:
      index = {"metadata": {}, "weight_map": {k: names[i] for k, i in self.weight_map.items()}}
      with open(os.path.join(self.dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names


def export_hf(
  decoder: Decoder,
  dst: str,
  *,
  tokenizer_src: str | None = None,
  dtype: Any = None,
  max_shard_bytes: int = 4 << 30,
) -> list[str]:
  """Writes an HF checkpoint (``model.safetensors`` [+ index], config.json).

  LoRA adapters are merged into their base kernels (base + alpha/r * A @ B),
  since HF Llama/Qwen2 has no place for them. One stacked parameter is on the
  host at a time. Returns the safetensors file names.
  """
  cfg = decoder.cfg
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(decoder)))
  out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(cfg.params_dtype)
  writer = _ShardWriter(dst, max_shard_bytes) if jax.process_index() == 0 else None
  if writer is not None:
    os.makedirs(dst, exist_ok=True)
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)
  merge = jax.jit(
    lambda w, a, b: (
      w.astype(jnp.float32) + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    ).astype(w.dtype)
  )
  for path, arr in flat.items():
    spec = hf_names(path, cfg.num_layers)
    if spec is None:
      continue
    if "base" in path:
      lora = path[: path.index("base")] + ("lora",)
      arr = merge(arr, flat[lora + ("lora_a",)], flat[lora + ("lora_b",)])
    host = _to_host(arr)  # every process joins the gather
    if writer is None:
      continue
    names, transpose = spec
    parts = list(host) if path[0] == "layers" else [host]
    for n, t in zip(names, parts):
      writer.add(n, (t.T if transpose else t).astype(out_dtype))
    del host, parts
  if writer is None:
    return []
  files = writer.finish()
  _write_hf_config(cfg, dst, out_dtype)
  _save_tokenizer(tokenizer_src, dst)
  return files


def hf_to_orbax(
  src: str, dst: str, *, param_dtype: str = "auto", mesh: Mesh | None = None, rules: Any = None
) -> dict[str, Any]:
  """Library form of the ``hf-to-orbax`` command; returns a summary dict."""
  source = open_source(src)
  if param_dtype == "auto":
    param_dtype = source.dtype("model.embed_tokens.weight").name
  hf_cfg = source.hf_config()
  cfg = ModelConfig.from_hf_dict(hf_cfg, param_dtype=param_dtype)
  decoder = load_hf_into_model(source, cfg, mesh, rules)
  std = save_orbax_dir(decoder, source, dst)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(decoder)))
  return dict(
    source=source.description,
    params=int(n),
    embed_std=std,
    param_dtype=param_dtype,
    dst=os.path.abspath(dst),
  )


def orbax_to_hf(
  src: str, dst: str, *, dtype: str | None = None, mesh: Mesh | None = None
) -> dict[str, Any]:
  """Library form of ``orbax-to-hf``: converted dir -> HF dir (+ tokenizer)."""
  with open(os.path.join(src, "config.json")) as f:
    stored = json.load(f).get("dtype", "float32")
  cfg, decoder = load_orbax_dir(src, mesh=mesh, param_dtype=stored)
  files = export_hf(decoder, dst, tokenizer_src=src, dtype=dtype or stored)
  return dict(files=files, dst=os.path.abspath(dst), dtype=dtype or stored, layers=cfg.num_layers)


def parse_mesh(spec: str) -> Mesh | None:
  """``"fsdp=-1,tensor=2"`` -> a Mesh over all devices ("" -> None: one device)."""
  if not spec:
    return None
  try:
    sizes = {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
  except ValueError:
    raise cfglib.ConfigError(f"config: --mesh: {spec!r} is not AXIS=SIZE[,AXIS=SIZE]") from None
  unknown = set(sizes) - set(shd.MESH_AXES)
  if unknown:
    raise cfglib.ConfigError(f"config: --mesh: unknown axes {sorted(unknown)}; use {shd.MESH_AXES}")
  shape = shd.resolve_mesh_shape(sizes, jax.device_count())
  return Mesh(np.asarray(jax.devices()).reshape(shape), shd.MESH_AXES)
