"""Lazy readers for foreign checkpoints: HF safetensors / PyTorch ``.bin`` / GGUF.

Every reader exposes the same small interface (:class:`TensorSource`): an
HF-style ``config.json`` dict, and tensors by their **HF names in HF layout**
(``model.layers.3.self_attn.q_proj.weight``, Linear weights ``[out, in]``),
read one at a time. ``convert.py`` only ever speaks HF names, so a new format
is one more reader here, not a change to the conversion logic.

Reading is lazy on purpose: an 8B checkpoint must convert on a host with less
than 2x its size in RAM, so nothing here materialises more than the tensor it
was asked for (safetensors and GGUF are memory-mapped; ``.bin`` files are
``torch.load``-ed with ``mmap=True``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from typing import Any, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads)
import numpy as np
from safetensors import safe_open

# Files a tokenizer may consist of; copied verbatim into a converted dir.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
)


class TensorSource(Protocol):
  """What ``convert.load_hf_into_model`` needs from a checkpoint."""

  description: str

  def hf_config(self) -> dict[str, Any]: ...

  def names(self) -> list[str]: ...

  def get(self, name: str) -> np.ndarray: ...

  def shape(self, name: str) -> tuple[int, ...]: ...

  def dtype(self, name: str) -> np.dtype: ...

  def save_tokenizer(self, dst: str) -> list[str]: ...


def copy_tokenizer_files(src_dir: str, dst: str) -> list[str]:
  """Copies whichever tokenizer files exist in ``src_dir``; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    p = os.path.join(src_dir, name)
    if os.path.isfile(p):
      shutil.copyfile(p, os.path.join(dst, name))
      copied.append(name)
  return copied


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


class _DirSource:
  """Shared part of the HF directory readers: config.json and tokenizer files."""

  def __init__(self, path: str):
    self.path = path
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{path}: no config.json (not an HF model directory)")
    self._config = _read_json(cfg_path)

  def hf_config(self) -> dict[str, Any]:
    return dict(self._config)

  def save_tokenizer(self, dst: str) -> list[str]:
    return copy_tokenizer_files(self.path, dst)


class SafetensorsSource(_DirSource):
  """``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

  def __init__(self, path: str):
    super().__init__(path)
    self._open = safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      weight_map = _read_json(index)["weight_map"]
    else:
      # A lone model.safetensors wins over other files (e.g. adapter weights).
      files = [os.path.join(path, "model.safetensors")]
      if not os.path.isfile(files[0]):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
      weight_map = {}
      for f in files:
        for k in self._handle(os.path.basename(f)).keys():
          weight_map[k] = os.path.basename(f)
    self._map: dict[str, str] = dict(weight_map)
    self.description = f"safetensors ({len(set(self._map.values()))} file(s)) in {path}"

  def _handle(self, fname: str):
    # One open (memory-mapped) handle per shard file, opened on first use.
    cache = self.__dict__.setdefault("_handles", {})
    if fname not in cache:
      cache[fname] = self._open(os.path.join(self.path, fname), framework="np")
    return cache[fname]

  def names(self) -> list[str]:
    return list(self._map)

  def get(self, name: str) -> np.ndarray:
    return self._handle(self._map[name]).get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self._map[name]).get_slice(name).get_shape())

  def dtype(self, name: str) -> np.dtype:
    st = self._handle(self._map[name]).get_slice(name).get_dtype()
    return np.dtype(
      {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}.get(
        st, np.float32
      )
    )


class TorchBinSource(_DirSource):
  """``pytorch_model.bin`` (or its sharded index); needs torch."""

  def __init__(self, path: str):
    super().__init__(path)
    try:
      import torch  # noqa: PLC0415 (optional: a test dependency, only for .bin files)
    except ImportError as e:  # pragma: no cover - torch is a test dependency
      raise ImportError(f"{path}: reading .bin checkpoints needs torch") from e
    self._torch = torch
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
      self._map = dict(_read_json(index)["weight_map"])
    else:
      files = sorted(glob.glob(os.path.join(path, "*.bin")))
      if not files:
        raise FileNotFoundError(f"{path}: no *.bin files")
      self._map = {}
      for f in files:
        for k in self._file(os.path.basename(f)):
          self._map[k] = os.path.basename(f)
    self.description = f"pytorch .bin ({len(set(self._map.values()))} file(s)) in {path}"

  def _file(self, fname: str) -> dict[str, Any]:
    cache = self.__dict__.setdefault("_files", {})
    if fname not in cache:
      cache[fname] = self._torch.load(
        os.path.join(self.path, fname), map_location="cpu", mmap=True, weights_only=True
      )
    return cache[fname]

  def _tensor(self, name: str):
    return self._file(self._map[name])[name]

  def names(self) -> list[str]:
    return list(self._map)

  def get(self, name: str) -> np.ndarray:
    t = self._tensor(name)
    if t.dtype == self._torch.bfloat16:  # numpy has no native bf16: reinterpret bits
      return t.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensor(name).shape)

  def dtype(self, name: str) -> np.dtype:
    t = self._tensor(name)
    return (
      np.dtype(ml_dtypes.bfloat16)
      if t.dtype == self._torch.bfloat16
      else np.dtype(str(t.dtype).removeprefix("torch."))
    )


# GGUF tensor names -> HF names (llama.cpp's naming for llama / qwen2 decoders).
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
  m = _GGUF_BLOCK.match(name)
  if m:
    layer, kind, suffix = m.groups()
    hf = _GGUF_LAYER.get(kind)
    return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
  base, _, suffix = name.rpartition(".")
  hf = _GGUF_TOP.get(base)
  return None if hf is None else f"{hf}.{suffix}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation for ``llama`` GGUFs.

  llama.cpp's kernels rotate interleaved pairs (x0, x1), (x2, x3) ... while HF
  rotates halves (x_i, x_{i+D/2}); its converter therefore reorders each head's
  output rows from [half0 | half1] to interleaved. We take the interleaved
  rows of every head and put the even ones first, then the odd ones.
  """
  rest = w.shape[1:]
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A llama.cpp GGUF file (llama or qwen2 architecture), dequantized per tensor."""

  def __init__(self, path: str):
    import gguf  # noqa: PLC0415 (only for GGUF sources)

    self._gguf = gguf
    self.path = path
    self._reader = gguf.GGUFReader(path)
    self._fields = self._reader.fields
    self.arch = str(self._field("general.architecture"))
    if self.arch not in ("llama", "qwen2"):
      raise ValueError(f"{path}: GGUF architecture {self.arch!r} is not supported (llama, qwen2)")
    if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
      raise ValueError(
        f"{path}: GGUF stores per-frequency RoPE factors (llama3-style "
        "scaling) that this converter cannot map; convert the "
        "safetensors checkpoint instead"
      )
    self._tensors = {}
    for t in self._reader.tensors:
      hf = gguf_to_hf_name(t.name)
      if hf is None:
        logging.warning("GGUF tensor %s has no HF counterpart; ignored", t.name)
        continue
      self._tensors[hf] = t
    self._config = self._build_config()
    self.description = f"GGUF {self.arch} ({os.path.basename(path)})"

  def _field(self, key: str, default: Any = None) -> Any:
    f = self._fields.get(key)
    return default if f is None else f.contents()

  def _build_config(self) -> dict[str, Any]:
    a = self.arch
    heads = int(self._field(f"{a}.attention.head_count"))
    hidden = int(self._field(f"{a}.embedding_length"))
    head_dim = self._field(f"{a}.attention.key_length")
    if head_dim is None and a == "llama":
      head_dim = self._field(f"{a}.rope.dimension_count")
    tokens = self._fields.get("tokenizer.ggml.tokens")
    vocab = self._field(f"{a}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
      vocab = self._tensors["model.embed_tokens.weight"].shape[-1]
    cfg: dict[str, Any] = dict(
      model_type=a,
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(self._field(f"{a}.feed_forward_length")),
      num_hidden_layers=int(self._field(f"{a}.block_count")),
      num_attention_heads=heads,
      num_key_value_heads=int(self._field(f"{a}.attention.head_count_kv", heads)),
      head_dim=int(head_dim or hidden // heads),
      rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
      max_position_embeddings=int(self._field(f"{a}.context_length", 8192)),
      tie_word_embeddings="lm_head.weight" not in self._tensors,
      bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
      eos_token_id=self._field("tokenizer.ggml.eos_token_id"),
    )
    scaling = self._field(f"{a}.rope.scaling.type")
    if scaling == "linear":
      cfg["rope_parameters"] = {
        "rope_type": "linear",
        "rope_theta": cfg["rope_theta"],
        "factor": float(self._field(f"{a}.rope.scaling.factor")),
      }
    elif scaling not in (None, "none"):
      raise ValueError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
    if a == "llama":
      cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
    return cfg

  def hf_config(self) -> dict[str, Any]:
    return dict(self._config)

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    # GGUF lists dims fastest-first; numpy / HF order is the reverse.
    return tuple(int(x) for x in reversed(self._tensors[name].shape))

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(np.float32)  # everything is dequantized to float32

  def get(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    w = self._gguf.quants.dequantize(t.data, t.tensor_type)
    w = np.asarray(w, np.float32).reshape(self.shape(name))
    if self.arch == "llama" and re.search(r"self_attn\.[qk]_proj\.", name):
      heads = self._config["num_attention_heads"]
      if ".k_proj." in name:
        heads = self._config["num_key_value_heads"]
      w = unpermute_rope_rows(w, heads)
    return w

  def save_tokenizer(self, dst: str) -> list[str]:
    """Builds an HF fast tokenizer from the GGUF vocabulary (via transformers)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (seconds to import)

    before = set(os.listdir(dst))
    tok = AutoTokenizer.from_pretrained(
      os.path.dirname(os.path.abspath(self.path)), gguf_file=os.path.basename(self.path)
    )
    tok.save_pretrained(dst)
    return sorted(set(os.listdir(dst)) - before)


def open_source(src: str) -> TensorSource:
  """Picks the reader for ``src``: a ``.gguf`` file or an HF model directory."""
  if os.path.isfile(src):
    if src.endswith(".gguf"):
      return GGUFSource(src)
    raise ValueError(
      f"{src}: a file source must be a .gguf; pass HF checkpoints as their directory"
    )
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such file or directory")
  if glob.glob(os.path.join(src, "*.safetensors")):
    return SafetensorsSource(src)
  if glob.glob(os.path.join(src, "*.bin")):
    return TorchBinSource(src)
  ggufs = glob.glob(os.path.join(src, "*.gguf"))
  if len(ggufs) == 1 and not os.path.isfile(os.path.join(src, "config.json")):
    return GGUFSource(ggufs[0])
  raise FileNotFoundError(
    f"{src}: found no model.safetensors(.index.json), pytorch_model.bin or single .gguf"
  )
