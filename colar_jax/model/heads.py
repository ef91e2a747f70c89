"""The CoLaR parts beside the decoder: the latent head (MLP -> diagonal Gaussian over
``embedding / embed_std``), the Coconut / Distill latent projection, and ``CoLaRModel``
which holds them with the decoder.

Both heads run in float32 whatever the decoder's compute dtype: their log-probs feed the
GRPO ratio.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from colar_jax.model.decoder import EMBED, LATENT, Decoder, ModelConfig


@flax.struct.dataclass
class Gaussian:
  """Diagonal Gaussian over (embedding / embed_std). ``log_std`` None = deterministic."""

  mean: jax.Array
  log_std: jax.Array | None
  temperature: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def std(self) -> jax.Array:
    if self.log_std is None:
      return jnp.zeros_like(self.mean)
    return jnp.exp(self.log_std) * self.temperature

  def sample(self, key: jax.Array) -> jax.Array:
    if self.log_std is None:
      return self.mean
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Element-wise log density (callers average over dims, as the reference)."""
    std = self.std
    return -0.5 * jnp.square((x - self.mean) / std) - jnp.log(std) - 0.5 * math.log(2 * math.pi)

  def entropy(self) -> jax.Array:
    return 0.5 + 0.5 * math.log(2 * math.pi) + jnp.log(self.std)


def _f32_linear(din: int, dout: int, axes: tuple[str, str], *, rngs: nnx.Rngs) -> nnx.Linear:
  """Float32 Linear with logical axes (the small heads stay fp32 under bf16 compute)."""
  return nnx.Linear(
    din,
    dout,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=rngs,
    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)),
  )


def _f32_layernorm(dim: int, axis: str, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    dim,
    epsilon=1e-5,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scale_init=nnx.with_partitioning(nnx.initializers.ones, (axis,)),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axis,)),
    rngs=rngs,
  )


class LatentHead(nnx.Module):
  """MLP(d->h, GELU, h->h, LayerNorm) -> Linear heads for mean and log-std."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.latent_hidden_size or cfg.hidden_size
    self.deterministic = cfg.latent_deterministic
    lin = functools.partial(_f32_linear, rngs=rngs)

    self.fc1 = lin(d, h, (EMBED, LATENT))
    self.fc2 = lin(h, h, (LATENT, LATENT))
    self.norm = _f32_layernorm(h, LATENT, rngs)
    self.mean = lin(h, d, (LATENT, EMBED))
    self.log_std = None if self.deterministic else lin(h, d, (LATENT, EMBED))

  def __call__(self, hidden: jax.Array, temperature: float = 1.0) -> Gaussian:
    # The head runs in float32 even under bf16 compute: it is tiny and its
    # log-probs feed the RL ratio, where bf16 rounding shows up as bias.
    x = hidden.astype(jnp.float32)
    x = self.norm(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))
    log_std = None if self.log_std is None else self.log_std(x)
    return Gaussian(mean=self.mean(x), log_std=log_std, temperature=temperature)


class LatentProjection(nnx.Module):
  """Linear(d->h), exact GELU, Linear(h->d), LayerNorm(d): hidden state -> next input.

  Used by the Coconut (optional) and Distill (CODI ``prj``) baselines, whose continuous
  thoughts feed the last hidden state back as the next input embedding; the LayerNorm
  keeps that embedding's scale stable across thoughts. Float32 like the latent head
  (tiny, and it sits in a recurrent loop where bf16 rounding compounds).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.latent_proj_size
    lin = functools.partial(_f32_linear, rngs=rngs)

    self.fc1 = lin(d, h, (EMBED, LATENT))
    self.fc2 = lin(h, d, (LATENT, EMBED))
    self.norm = _f32_layernorm(d, EMBED, rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    x = hidden.astype(jnp.float32)
    return self.norm(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class CoLaRModel(nnx.Module):
  """The decoder plus the latent head; what every method trains and checkpoints.

  ``latent_proj`` exists only when ``cfg.latent_proj_size > 0`` (Coconut / Distill
  baselines), so the parameter tree of every other method is unchanged.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.lm = Decoder(cfg, rngs=rngs)
    self.latent_head = LatentHead(cfg, rngs=rngs)
    self.latent_proj = LatentProjection(cfg, rngs=rngs) if cfg.latent_proj_size > 0 else None
