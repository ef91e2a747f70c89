"""The network: the Llama / Qwen2 decoder, the CoLaR heads and the sharding rules."""

from colar_jax.model.decoder import (
  Decoder,
  DecoderOutput,
  KVCache,
  ModelConfig,
  apply_rope,
  positions_from_mask,
  rope_inv_freq,
)
from colar_jax.model.heads import CoLaRModel, Gaussian, LatentHead, LatentProjection

__all__ = [
  "CoLaRModel",
  "Decoder",
  "DecoderOutput",
  "Gaussian",
  "KVCache",
  "LatentHead",
  "LatentProjection",
  "ModelConfig",
  "apply_rope",
  "positions_from_mask",
  "rope_inv_freq",
]
