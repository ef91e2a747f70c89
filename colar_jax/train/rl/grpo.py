"""GRPO over latent reasoning: rewards, group advantages, clipped surrogate.

Pure functions, one per paper equation, so ``train/rl/loop.py`` stays a loop and the
math is unit-testable against NumPy. Follows the reference (tiny-grpo derived
``src/modules/grpo.py``) with its normaliser exposed instead of hard-coded.
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
  average_per_token: bool = True,
  sum_normalizer: float = 32.0,
) -> tuple[jax.Array, jax.Array]:
  """PPO-clipped loss over a [B, T] sequence of log-probs; returns (loss, clip_frac).

  Per sequence: mean over its real tokens (``average_per_token``) or a sum
  divided by a fixed ``sum_normalizer`` (the reference divides by 32); then the
  mean over sequences. The log-ratio is clamped to [-3, 3] as the reference,
  so one stale sample cannot blow up the step.
  """
  mask = mask.astype(jnp.float32)
  diff = jnp.clip(jnp.where(mask > 0, logp - old_logp, 0.0), -3.0, 3.0)
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
