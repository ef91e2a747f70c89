"""GRPO over latent reasoning: rewards, group advantages, clipped surrogate.

Pure functions, one per paper equation, so ``train/rl/loop.py`` stays a loop and the
math is unit-testable against NumPy. Follows the reference (tiny-grpo derived
``src/modules/grpo.py``) with its normaliser exposed instead of hard-coded; the
log-ratio clamp is an opt-in extra (``rl.clip_log_ratio``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def length_aware_rewards(
  correct: jax.Array, n_latent: jax.Array, punish_latent_length: bool
) -> jax.Array:
  """r = 1[correct], optionally / #latent steps (the paper's compact-chain reward)."""
  r = correct.astype(jnp.float32)
  if punish_latent_length:
    r = r / jnp.maximum(n_latent.astype(jnp.float32), 1.0)
  return r


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-8) -> jax.Array:
  """A = (r - mean_group) / (std_group + eps); rewards flat [N * G], groups contiguous.

  std is the unbiased sample std (torch ``.std()`` default, as the reference);
  a group whose rewards are all equal gets zero advantage.
  """
  g = rewards.reshape(-1, group_size)
  mean = g.mean(axis=1, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(g - mean), axis=1, keepdims=True) / max(group_size - 1, 1))
  return ((g - mean) / (std + eps)).reshape(-1)


def clipped_surrogate(
  logp: jax.Array,
  old_logp: jax.Array,
  mask: jax.Array,
  advantages: jax.Array,
  clip_eps: float,
  average_per_token: bool = False,
  sum_normalizer: float = 32.0,
  clip_log_ratio: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """PPO-clipped loss over a [B, T] sequence of log-probs; returns (loss, clip_frac).

  The ratio is the reference's plain ``exp(logp - old_logp)``. Per sequence: a sum
  divided by a fixed ``sum_normalizer`` (the reference's default, which divides by 32)
  or the mean over its real tokens (``average_per_token``); then the mean over
  sequences. ``clip_log_ratio > 0`` (opt-in, not in the reference) clamps the log-ratio
  to [-clip_log_ratio, clip_log_ratio] before the exp, a guard against one stale sample's
  huge ratio; padded positions get log-ratio 0 either way, so their garbage log-probs
  never reach the exp.
  """
  mask = mask.astype(jnp.float32)
  diff = jnp.where(mask > 0, logp - old_logp, 0.0)
  if clip_log_ratio > 0:
    diff = jnp.clip(diff, -clip_log_ratio, clip_log_ratio)
  ratio = jnp.exp(diff)
  adv = advantages[:, None]
  surr1 = ratio * adv
  surr2 = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv
  per_tok = -jnp.minimum(surr1, surr2) * mask
  if average_per_token:
    per_seq = per_tok.sum(-1) / (mask.sum(-1) + 1e-5)
  else:
    per_seq = per_tok.sum(-1) / sum_normalizer
  clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32) * mask
  clip_frac = clipped.sum() / jnp.maximum(mask.sum(), 1.0)
  return per_seq.mean(), clip_frac


def kl_k3(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """Schulman's k3 estimator of KL(pi || ref), per-token mean (optional term)."""
  d = ref_logp - logp
  k3 = jnp.exp(d) - d - 1.0
  mask = mask.astype(jnp.float32)
  return (k3 * mask).sum() / jnp.maximum(mask.sum(), 1.0)
