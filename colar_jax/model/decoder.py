"""Flax NNX decoder (Llama / Qwen2 families).

One module serves every method: the forward takes token ids OR continuous
input embeddings (CoLaR feeds compressed / sampled latent embeddings), a
left-padded attention mask, and an optional static-shape KV cache with a
per-row write index, so prefill, latent steps and answer decoding are all the
same call.

Layers are stacked on a leading ``layers`` axis and run with ``jax.lax.scan``:
compile time stays flat in depth (SmolLM2 has 30 layers) and the parameter
layout matches MaxText-style scanned checkpoints. Every parameter carries
logical axis names (see ``sharding.py`` for the rules that map them to mesh
axes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

# The seven projections of a block (HF module names) and the reference's LoRA targets
# (PEFT's llama / qwen2 default: q_proj, v_proj); the config schema is their one source.
from colar_jax.config.schema import LORA_DEFAULT_TARGETS, LORA_PROJECTIONS

# Parameters carry logical axis names and are placed explicitly by
# ``sharding.create_sharded`` (eval_shape + jitted init with out_shardings), so
# flax's eager per-variable sharding (which needs a mesh at construction) is off.
nnx.use_eager_sharding(False)

# Logical axis names used by the parameters (mapped to mesh axes by config rules).
EMBED, VOCAB, MLP, Q_HEADS, KV_HEADS, LAYERS, LATENT = (
  "embed",
  "vocab",
  "mlp",
  "q_heads",
  "kv_heads",
  "layers",
  "latent_mlp",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture + numerics. Built from an HF ``config.json`` or a preset."""

  vocab_size: int = 256
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_parameters minus theta
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2 / Llama attention_bias
  mlp_bias: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  # Numerics.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # jax.checkpoint each layer (trades compute for activation memory)
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation (None = xla)
  # LoRA (0 = full fine-tuning) on the projections named in ``lora_targets``.
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
  # Latent head (CoLaR): MLP width and deterministic variant (mean only).
  latent_hidden_size: int = 0  # 0 = hidden_size
  latent_deterministic: bool = False
  # Coconut / Distill baselines: width of the MLP that maps a last hidden state to the
  # next input embedding (``CoLaRModel.latent_proj``); 0 = no projection module.
  latent_proj_size: int = 0

  def __post_init__(self):
    unknown = [t for t in self.lora_targets if t not in LORA_PROJECTIONS]
    if unknown:
      raise ValueError(f"lora_targets: unknown projections {unknown}; known: {LORA_PROJECTIONS}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  def has_lora(self, name: str) -> bool:
    """Whether projection ``name`` (e.g. ``"q_proj"``) carries a LoRA adapter."""
    return self.lora_rank > 0 and name in self.lora_targets

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides) -> ModelConfig:
    """Maps an HF ``config.json`` dict (Llama or Qwen2) to a ModelConfig."""
    mtype = d.get("model_type", "llama")
    if mtype not in ("llama", "qwen2", "mistral"):
      raise ValueError(
        f"config.json: model_type {mtype!r} is not supported (llama, qwen2, mistral)"
      )
    heads = d["num_attention_heads"]
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
      raise ValueError(
        f"config.json: rope_type {rope_type!r} is not supported (default, llama3, linear)"
      )
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0]
    cfg = cls(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads,
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
      tie_embeddings=bool(d.get("tie_word_embeddings", mtype == "llama")),
      qkv_bias=True if mtype == "qwen2" else bool(d.get("attention_bias", False)),
      mlp_bias=bool(d.get("mlp_bias", False)),
      model_type=mtype,
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=eos,
    )
    return cfg.replace(**overrides)

  @classmethod
  def from_hf_dir(cls, path: str, **overrides) -> ModelConfig:
    text = epath.Path(path, "config.json").read_text()  # a local dir or gs://
    return cls.from_hf_dict(json.loads(text), **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """Inverse of ``from_hf_dict`` (for ``orbax-to-hf`` export)."""
    d: dict[str, Any] = dict(
      model_type=self.model_type,
      architectures=["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_hidden_layers=self.num_layers,
      num_attention_heads=self.num_heads,
      num_key_value_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      rms_norm_eps=self.rms_norm_eps,
      tie_word_embeddings=self.tie_embeddings,
      hidden_act="silu",
      max_position_embeddings=8192,
      bos_token_id=self.bos_token_id,
      eos_token_id=self.eos_token_id,
      torch_dtype="float32",
    )
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    rope.update(dict(self.rope_scaling or ()))
    d["rope_parameters"] = rope
    d["rope_theta"] = self.rope_theta
    if self.model_type != "qwen2":
      d["attention_bias"] = self.qkv_bias
      d["mlp_bias"] = self.mlp_bias
    return d


# ----------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies incl. HF ``llama3`` / ``linear`` scaling (float32)."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  p = dict(cfg.rope_scaling or ())
  kind = p.get("rope_type", "default")
  if kind == "linear":
    inv = inv / p["factor"]
  elif kind == "llama3":
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF convention). x: [B, T, H, D]; positions: [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
  """Static-shape cache. ``index[b]`` is the next slot row b writes to.

  ``mask[b, s]`` says slot s of row b holds a real token. A row whose new
  tokens are all masked does not advance its index, so a finished rollout row
  keeps overwriting one masked slot instead of growing (its cache "freezes").
  """

  k: jax.Array  # [L, B, S, Hkv, D]
  v: jax.Array  # [L, B, S, Hkv, D]
  mask: jax.Array  # [B, S] bool
  index: jax.Array  # [B] int32

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch, length), bool),
      index=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def length(self) -> int:
    return self.k.shape[2]

  def num_valid(self) -> jax.Array:
    return self.mask.sum(axis=-1).astype(jnp.int32)


def _write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """buf [B, S, ...] <- new [B, T, ...] at per-row offsets index [B]."""

  def one(b, n, i):
    start = (i,) + (0,) * (b.ndim - 1)
    return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), start)

  return jax.vmap(one)(buf, new, index)


def positions_from_mask(mask: jax.Array, offset: jax.Array | None = None) -> jax.Array:
  """HF-style position ids for a left-padded mask: cumsum - 1 (+ cached count)."""
  pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  if offset is not None:
    pos = pos + offset[:, None]
  return jnp.maximum(pos, 0)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
def _init(std: float = 0.02):
  return nnx.initializers.normal(std)


def _linear(
  cfg: ModelConfig,
  din: int,
  dout: int,
  axes: tuple[str | None, str | None],
  rngs: nnx.Rngs,
  bias: bool = False,
  name: str = "",
) -> nnx.Module:
  kw = dict(
    use_bias=bias,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    kernel_init=nnx.with_partitioning(_init(), axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)),
    rngs=rngs,
  )
  if cfg.has_lora(name):
    # Flax's LoRALinear: frozen base kernel + trainable low-rank A/B (B zero-init,
    # so the adapted model starts equal to the base). Scale alpha/rank applied in
    # ``LoRAProj`` below because flax's LoRA has no scaling factor.
    return LoRAProj(cfg, din, dout, axes, rngs, bias, kw)
  return nnx.Linear(din, dout, **kw)


class LoRAProj(nnx.Module):
  """Linear + flax ``nnx.LoRA`` adapter scaled by alpha / rank (as PEFT)."""

  def __init__(self, cfg, din, dout, axes, rngs, bias, kw):
    self.base = nnx.Linear(din, dout, **kw)
    self.lora = nnx.LoRA(
      din,
      cfg.lora_rank,
      dout,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      a_initializer=nnx.with_partitioning(nnx.initializers.he_uniform(), (axes[0], None)),
      b_initializer=nnx.with_partitioning(nnx.initializers.zeros, (None, axes[1])),
      rngs=rngs,
    )
    self.scale = cfg.lora_alpha / cfg.lora_rank

  @property
  def kernel(self):
    return self.base.kernel

  @property
  def bias(self):
    return self.base.bias

  def __call__(self, x):
    return self.base(x) + self.scale * self.lora(x)


class RMSNorm(nnx.Module):
  def __init__(self, cfg: ModelConfig, dim: int, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.rms_norm_eps
    self.scale = nnx.Param(
      nnx.with_partitioning(nnx.initializers.ones, (EMBED,))(
        jax.random.key(0), (dim,), cfg.params_dtype
      )
    )

  def __call__(self, x):
    # Normalise in float32 then cast back, as HF does (matters in bf16).
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = _linear(cfg, d, h * hd, (EMBED, Q_HEADS), rngs, cfg.qkv_bias, "q_proj")
    self.k_proj = _linear(cfg, d, kv * hd, (EMBED, KV_HEADS), rngs, cfg.qkv_bias, "k_proj")
    self.v_proj = _linear(cfg, d, kv * hd, (EMBED, KV_HEADS), rngs, cfg.qkv_bias, "v_proj")
    self.o_proj = _linear(cfg, h * hd, d, (Q_HEADS, EMBED), rngs, False, "o_proj")

  def __call__(self, x, positions, inv_freq, kv_mask, q_slot, cache_kv):
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cache_kv is not None:
      ck, cv, index = cache_kv
      ck = _write_rows(ck, k, index)
      cv = _write_rows(cv, v, index)
      k_all, v_all, new_kv = ck, cv, (ck, cv)
    else:
      k_all, v_all, new_kv = k, v, None
    s = k_all.shape[1]
    # allowed[b, t, s]: key slot s is a real token and not in the future of query t.
    allowed = kv_mask[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slot[:, :, None])
    out = jax.nn.dot_product_attention(
      q,
      k_all.astype(q.dtype),
      v_all.astype(q.dtype),
      mask=allowed[:, None],
      implementation=cfg.attention_impl,
    )
    return self.o_proj(out.reshape(b, t, -1)), new_kv


class MLPBlock(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, d, f, (EMBED, MLP), rngs, cfg.mlp_bias, "gate_proj")
    self.up_proj = _linear(cfg, d, f, (EMBED, MLP), rngs, cfg.mlp_bias, "up_proj")
    self.down_proj = _linear(cfg, f, d, (MLP, EMBED), rngs, cfg.mlp_bias, "down_proj")

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg, cfg.hidden_size, rngs)
    self.attn = Attention(cfg, rngs)
    self.post_attn_norm = RMSNorm(cfg, cfg.hidden_size, rngs)
    self.mlp = MLPBlock(cfg, rngs)

  def __call__(self, x, positions, inv_freq, kv_mask, q_slot, cache_kv):
    h, new_kv = self.attn(self.input_norm(x), positions, inv_freq, kv_mask, q_slot, cache_kv)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_kv


@flax.struct.dataclass
class DecoderOutput:
  logits: jax.Array | None  # [B, T, V] float32 (None when logits=False)
  hidden: jax.Array  # [B, T, D] last hidden state (after the final norm, as HF)
  cache: KVCache | None
  all_hidden: jax.Array | None = None  # [L+1, B, T, D] (embeddings + each layer), on request


class Decoder(nnx.Module):
  """Llama / Qwen2 causal LM."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      embedding_init=nnx.with_partitioning(_init(), (VOCAB, EMBED)),
      rngs=rngs,
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make_layers(r):
      return Block(cfg, r)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg, cfg.hidden_size, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(
        cfg.hidden_size,
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernel_init=nnx.with_partitioning(_init(), (EMBED, VOCAB)),
        rngs=rngs,
      )

  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    return self.embed(ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.cfg.tie_embeddings:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    logits: bool = True,
    output_all_hidden: bool = False,
  ) -> DecoderOutput:
    """Runs T new tokens. With a cache, they are appended at each row's index.

    Exactly one of ``input_ids`` [B, T] / ``inputs_embeds`` [B, T, D] is given.
    ``attention_mask`` [B, T] marks real tokens (left padding allowed);
    positions default to the count of real tokens before each one.
    """
    cfg = self.cfg
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids / inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    x = x.astype(cfg.compute_dtype)
    b, t = x.shape[:2]
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      kv_mask, q_slot = mask, jnp.broadcast_to(jnp.arange(t)[None], (b, t))
      if positions is None:
        positions = positions_from_mask(mask)
    else:
      if positions is None:
        positions = positions_from_mask(mask, cache.num_valid())
      q_slot = cache.index[:, None] + jnp.arange(t)[None]
      kv_mask = _write_rows(cache.mask, mask, cache.index)
    inv_freq = rope_inv_freq(cfg)

    graphdef, layer_state = nnx.split(self.layers)

    def body(carry, xs):
      h = carry
      st, ck, cv = xs
      blk = nnx.merge(graphdef, st)
      kv = None if cache is None else (ck, cv, cache.index)
      h, new_kv = blk(h, positions, inv_freq, kv_mask, q_slot, kv)
      ys = (new_kv if new_kv is not None else (None, None)), (h if output_all_hidden else None)
      return h, ys

    if cfg.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    xs = (layer_state, None if cache is None else cache.k, None if cache is None else cache.v)
    h, ((new_k, new_v), per_layer) = jax.lax.scan(body, x, xs)
    hidden = self.final_norm(h)
    new_cache = None
    if cache is not None:
      moved = jnp.any(mask, axis=-1).astype(jnp.int32) * t
      new_cache = KVCache(k=new_k, v=new_v, mask=kv_mask, index=cache.index + moved)
    all_hidden = None
    if output_all_hidden:
      all_hidden = jnp.concatenate([x[None], per_layer[:-1], hidden[None]], axis=0)
    return DecoderOutput(
      logits=self.logits(hidden) if logits else None,
      hidden=hidden,
      cache=new_cache,
      all_hidden=all_hidden,
    )
