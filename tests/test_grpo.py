"""GRPO math against hand values and PPO-clip written from its definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _ppo_loss_by_hand(logp, old, mask, adv, eps, per_token, norm=32.0, log_ratio_cap=None):
  """PPO-clip written from its definition, one scalar at a time (the test's oracle):
  per real token l = -min(r A, clip(r, 1-eps, 1+eps) A) with r = exp(logp - old);
  per sequence sum / norm (or / #tokens); mean over sequences."""
  per_seq = []
  for b in range(len(logp)):
    total, count = 0.0, 0
    for t in range(len(logp[b])):
      if not mask[b][t]:
        continue
      d = float(logp[b][t]) - float(old[b][t])
      if log_ratio_cap is not None:
        d = max(-log_ratio_cap, min(log_ratio_cap, d))
      r = math.exp(d)
      a = float(adv[b])
      total += -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
      count += 1
    per_seq.append(total / count if per_token else total / norm)
  return sum(per_seq) / len(per_seq)


def _surrogate(logp, old, mask, adv, **kw):
  loss, frac = grpo.clipped_surrogate(
    jnp.asarray(logp, jnp.float32),
    jnp.asarray(old, jnp.float32),
    jnp.asarray(mask, jnp.float32),
    jnp.asarray(adv, jnp.float32),
    0.2,
    **kw,
  )
  return float(loss), float(frac)


def test_clipped_surrogate_matches_the_definition():
  rng = np.random.default_rng(0)
  logp = rng.normal(size=(4, 6))
  old = logp + rng.normal(scale=0.5, size=(4, 6))
  mask = rng.random((4, 6)) > 0.3
  adv = np.array([1.0, -1.0, 0.5, -2.0])
  for per_token in (True, False):
    got, frac = _surrogate(logp, old, mask, adv, average_per_token=per_token)
    want = _ppo_loss_by_hand(logp, old, mask, adv, 0.2, per_token)
    assert got == pytest.approx(want, rel=1e-5), per_token
    assert 0.0 < frac <= 1.0


def test_default_is_the_reference_sum_over_32():
  """rl.average_per_token=False (reference): a sequence's token losses are summed and
  divided by 32. Ratio 1 everywhere: loss = mean_b(-A_b * n_b / 32)."""
  logp = np.zeros((2, 3))
  mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
  loss, frac = _surrogate(logp, logp, mask, [2.0, -1.0])
  assert loss == pytest.approx((-2.0 * 3 / 32 + 1.0 * 1 / 32) / 2, rel=1e-5)
  assert frac == 0.0
  loss, _ = _surrogate(logp, logp, mask, [2.0, -1.0], average_per_token=True)
  assert loss == pytest.approx((-2.0 + 1.0) / 2, rel=1e-4)  # per-token mean: -A


def test_plain_ratio_by_default_and_the_log_ratio_cap_is_opt_in():
  """One token whose probability rose by e^5 under a negative advantage: the reference's
  plain ratio keeps the full e^5 in the pessimistic (unclipped) branch; only
  clip_log_ratio=3 caps it at e^3."""
  logp, old, mask, adv = [[5.0]], [[0.0]], [[True]], [-1.0]
  plain, frac = _surrogate(logp, old, mask, adv, average_per_token=True)
  assert plain == pytest.approx(math.exp(5.0), rel=1e-5)  # -min(-e^5, -1.2) = e^5
  assert frac == 1.0
  capped, _ = _surrogate(logp, old, mask, adv, average_per_token=True, clip_log_ratio=3.0)
  assert capped == pytest.approx(math.exp(3.0), rel=1e-5)
  rng = np.random.default_rng(1)
  lp, ol = rng.normal(scale=3.0, size=(3, 5)), rng.normal(scale=3.0, size=(3, 5))
  m, a = rng.random((3, 5)) > 0.2, np.array([1.0, -1.0, -0.5])
  got, _ = _surrogate(lp, ol, m, a, clip_log_ratio=2.0)
  assert got == pytest.approx(_ppo_loss_by_hand(lp, ol, m, a, 0.2, False, log_ratio_cap=2.0))
  assert got != pytest.approx(_ppo_loss_by_hand(lp, ol, m, a, 0.2, False), rel=1e-3)


def test_padding_never_reaches_the_exp():
  """Padded positions may hold anything (here a new log-prob 1e4 above the old one, whose
  exp overflows to inf and, under a negative advantage, would make the loss NaN): the
  loss and its gradient stay finite, equal to those of the unpadded sequence."""
  logp = jnp.array([[-0.5, 1e4]])
  old = jnp.array([[-0.7, 0.0]])
  mask = jnp.array([[1.0, 0.0]])

  def f(lp):
    return grpo.clipped_surrogate(lp, old, mask, jnp.array([-1.0]), 0.2)[0]

  loss, grad = jax.value_and_grad(f)(logp)
  want = _ppo_loss_by_hand([[-0.5]], [[-0.7]], [[1]], [-1.0], 0.2, False)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert np.isfinite(np.asarray(grad)).all() and float(grad[0, 1]) == 0.0


def test_kl_zero_for_identical_policies():
  lp = jnp.array([[-1.0, -2.0]])
  assert float(grpo.kl_k3(lp, lp, jnp.ones_like(lp))) == 0.0
  assert float(grpo.kl_k3(lp, lp + 0.5, jnp.ones_like(lp))) > 0.0
