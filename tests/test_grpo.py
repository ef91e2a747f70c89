"""GRPO math against NumPy on hand values."""

import jax.numpy as jnp
import numpy as np

from colar_jax.train.rl import grpo


def test_group_advantages_hand_values():
  r = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  a = np.asarray(grpo.group_advantages(r, group_size=4))
  # group 1: mean .5, unbiased std sqrt(1/3) -> +-0.866
  np.testing.assert_allclose(a[:4], [0.8660254, -0.8660254, 0.8660254, -0.8660254], rtol=1e-5)
  np.testing.assert_array_equal(a[4:], 0.0)  # all-equal group: no signal


def test_length_aware_rewards():
  c = jnp.array([1, 1, 0, 1])
  n = jnp.array([2, 4, 3, 0])
  np.testing.assert_allclose(grpo.length_aware_rewards(c, n, True), [0.5, 0.25, 0.0, 1.0])
  np.testing.assert_allclose(grpo.length_aware_rewards(c, n, False), [1, 1, 0, 1])


def _np_clipped(logp, old, mask, adv, eps, per_token, norm=32.0):
  diff = np.clip(np.where(mask > 0, logp - old, 0), -3, 3)
  ratio = np.exp(diff)
  l = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None]) * mask
  per_seq = l.sum(-1) / (mask.sum(-1) + 1e-5) if per_token else l.sum(-1) / norm
  return per_seq.mean()


def test_clipped_surrogate_matches_numpy():
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(4, 6)).astype(np.float32)
  old = logp + rng.normal(scale=0.5, size=(4, 6)).astype(np.float32)
  mask = (rng.random((4, 6)) > 0.3).astype(np.float32)
  adv = np.array([1.0, -1.0, 0.5, -2.0], np.float32)
  for per_token in (True, False):
    got, frac = grpo.clipped_surrogate(
      jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask), jnp.asarray(adv), 0.2, per_token
    )
    np.testing.assert_allclose(
      float(got), _np_clipped(logp, old, mask, adv, 0.2, per_token), rtol=1e-5
    )
    assert 0.0 < float(frac) <= 1.0


def test_ratio_one_gives_minus_advantage_and_no_clipping():
  logp = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3))
  loss, frac = grpo.clipped_surrogate(logp, logp, mask, jnp.array([2.0, -1.0]), 0.2)
  np.testing.assert_allclose(float(loss), -0.5, rtol=1e-4)  # mean(-2, +1)
  assert float(frac) == 0.0


def test_kl_zero_for_identical_policies():
  lp = jnp.array([[-1.0, -2.0]])
  assert float(grpo.kl_k3(lp, lp, jnp.ones_like(lp))) == 0.0
  assert float(grpo.kl_k3(lp, lp + 0.5, jnp.ones_like(lp))) > 0.0
