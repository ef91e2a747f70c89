"""Answer sampling as HF ``generate``: temperature, then top-k, then top-p within the top-k.

Oracles: a NumPy transcription of HF's definition (``TemperatureLogitsWarper`` ->
``TopKLogitsWarper`` -> ``TopPLogitsWarper``), and, for vocabularies that top-k does not
cut, a private copy of the full-vocabulary sampler as it was before top-k existed (the
draws there must stay bit-identical: the embedded demo's char vocabulary has ~30 tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colar_jax.decode.sampling import (
  categorical,
  filter_logits,
  first_argmax,
  sample_tokens,
  top_p_mask,
)


def hf_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """HF's warpers on one row: -inf outside the kept set, scaled logits inside.

  TopK removes every score below the k-th largest (so ties with the k-th all stay);
  TopP sorts ascending, removes the tokens whose cumulative probability is <= 1 - p and
  always keeps the most likely one.
  """
  s = np.asarray(logits, np.float64) / temperature
  if top_k > 0:
    kth = np.sort(s)[-min(top_k, s.size)]
    s = np.where(s < kth, -np.inf, s)
  if top_p < 1.0:
    order = np.argsort(s, kind="stable")
    e = np.exp(s[order] - s.max())
    cum = np.cumsum(e / e.sum())
    remove = cum <= 1 - top_p
    remove[-1] = False
    s = s.copy()
    s[order[remove]] = -np.inf
  return s


def renormalised(filtered: np.ndarray) -> np.ndarray:
  e = np.where(np.isfinite(filtered), np.exp(filtered - filtered.max()), 0.0)
  return e / e.sum()


def _before_sample_tokens(keys, logits, *, temperature=1.0, top_p=1.0):
  """The sampler before top-k (the oracle of "before"): stable full sort, inverse
  permutation, categorical over the masked full-vocabulary logits."""
  scaled = logits.astype(jnp.float32) / max(float(temperature), 1e-6)
  if top_p < 1.0:
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    sp = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    keep = (jnp.cumsum(sp, axis=-1) - sp < top_p).at[..., 0].set(True)
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
    scaled = jnp.where(keep, scaled, -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


@pytest.mark.parametrize("vocab", [12, 1000])
def test_filter_matches_hf_warpers(vocab):
  rng = np.random.default_rng(vocab)
  for scale in (0.5, 2.0, 6.0):  # flat to peaked distributions
    logits = (rng.standard_normal((4, vocab)) * scale).astype(np.float32)
    for temperature in (1.0, 0.7):
      for top_k in (0, 1, 5, 50):
        for top_p in (1.0, 0.9, 0.5, 0.05):
          ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_p, top_k))
          for row in range(4):
            ref = hf_filter(logits[row], temperature, top_k, top_p)
            case = (scale, temperature, top_k, top_p, row)
            np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(ref), case)
            np.testing.assert_allclose(
              renormalised(ours[row]), renormalised(ref), atol=1e-6, err_msg=str(case)
            )


def test_nucleus_is_taken_within_the_top_k():
  probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
  logits = jnp.log(jnp.asarray(probs))[None]

  def kept(top_k, top_p):
    return np.isfinite(np.asarray(filter_logits(logits, 1.0, top_p, top_k))[0]).nonzero()[0]

  # Over the whole vocabulary 0.3 + 0.25 < 0.6 <= 0.75: three tokens. Within the top 3
  # (renormalised 0.4, 0.333, 0.267) the first two already hold 0.733 >= 0.6.
  assert kept(0, 0.6).tolist() == [0, 1, 2]
  assert kept(3, 0.6).tolist() == [0, 1]
  assert kept(3, 0.01).tolist() == [0]  # the top token is always kept
  assert kept(2, 1.0).tolist() == [0, 1]


def test_ties_break_towards_the_lower_token_id():
  # Top-k boundary: ids 1, 2, 3 tie for the 2nd place. HF would keep all three (its
  # TopK keeps every score >= the k-th); we keep exactly k, the lower ids first.
  tied = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.2, 0.0 + 1e-9]]))
  assert np.isfinite(np.asarray(filter_logits(tied, 1.0, 1.0, 2))[0]).nonzero()[0].tolist() == [
    0,
    1,
  ]
  assert np.isfinite(hf_filter(np.asarray(tied[0]), 1.0, 2, 1.0)).nonzero()[0].tolist() == [
    0,
    1,
    2,
    3,
  ]
  # Top-p boundary: 0.4 + 0.2 >= 0.5, so one of the tied 0.2s completes the nucleus: the
  # lower id, both with top-k cutting the vocabulary and without (the full-sort path).
  for top_k in (0, 4):
    kept = np.isfinite(np.asarray(filter_logits(tied, 1.0, 0.5, top_k))[0]).nonzero()[0]
    assert kept.tolist() == [0, 1], top_k
  assert np.asarray(top_p_mask(tied, 0.5))[0].nonzero()[0].tolist() == [0, 1]


@pytest.mark.parametrize("top_k", [0, 30, 50])
def test_draws_bit_identical_to_before_when_top_k_keeps_the_vocabulary(top_k):
  vocab, n = 30, 512  # the demo's vocabulary size is ~30: top_k 50 does not cut it
  logits = jax.random.normal(jax.random.key(1), (n, vocab)) * 3.0
  keys = jax.random.split(jax.random.key(2), n)
  for temperature in (1.0, 0.7):
    for top_p in (0.9, 0.5, 1.0):
      before = _before_sample_tokens(keys, logits, temperature=temperature, top_p=top_p)
      now = sample_tokens(keys, logits, temperature=temperature, top_p=top_p, top_k=top_k)
      assert now.dtype == jnp.int32 and now.shape == (n,)
      np.testing.assert_array_equal(np.asarray(now), np.asarray(before))


def test_sampled_frequencies_follow_the_renormalised_distribution():
  logits = np.log(np.array([0.3, 0.22, 0.15, 0.11, 0.09, 0.07, 0.04, 0.02], np.float32))
  temperature, top_k, top_p, n = 0.8, 5, 0.8, 20_000
  expected = renormalised(hf_filter(logits, temperature, top_k, top_p))
  assert 2 < (expected > 0).sum() < top_k  # both filters bite
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(
    sample_tokens(
      keys,
      jnp.broadcast_to(jnp.asarray(logits), (n, logits.size)),
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
  )
  freq = np.bincount(draws, minlength=logits.size) / n
  assert (freq[expected == 0] == 0).all(), freq
  np.testing.assert_allclose(freq, expected, atol=0.015)  # ~4 sigma at n = 20k


def test_greedy_and_zero_temperature_take_the_argmax():
  logits = jnp.asarray([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
  keys = jax.random.split(jax.random.key(0), 2)
  for kw in (dict(greedy=True), dict(temperature=0.0), dict(greedy=True, top_k=2, top_p=0.5)):
    assert np.asarray(sample_tokens(keys, logits, **kw)).tolist() == [1, 0], kw
  # top_k = 1 is greedy too, whatever the key.
  many = jax.random.split(jax.random.key(1), 64)
  draws = sample_tokens(many, jnp.broadcast_to(logits[0], (64, 4)), top_k=1)
  assert (np.asarray(draws) == 1).all()


@pytest.mark.parametrize("shape", [(7, 5), (1, 7), (3, 49153), (1, 49153)])
def test_categorical_is_jax_random_categorical_draw_for_draw(shape):
  logits = jax.random.normal(jax.random.key(3), shape) * 2.0
  logits = logits.at[0, 1:3].set(-jnp.inf)  # masked entries, as the filters leave them
  for seed in range(2):
    keys = jax.random.split(jax.random.key(seed), shape[0])
    np.testing.assert_array_equal(
      np.asarray(categorical(keys, logits)),
      np.asarray(jax.vmap(jax.random.categorical)(keys, logits)),
    )
  raw = jax.random.split(jax.random.PRNGKey(5), shape[0])  # legacy uint32 keys
  np.testing.assert_array_equal(
    np.asarray(categorical(raw, logits)), np.asarray(jax.vmap(jax.random.categorical)(raw, logits))
  )
  keys = jax.random.split(jax.random.key(9), 4096)  # many draws over a small vocabulary
  small = jnp.broadcast_to(logits[-1, :5], (4096, 5))
  np.testing.assert_array_equal(
    np.asarray(categorical(keys, small)), np.asarray(jax.vmap(jax.random.categorical)(keys, small))
  )


def test_first_argmax_is_jnp_argmax():
  x = jnp.asarray(
    [[1.0, 3.0, 3.0, 0.0], [-jnp.inf] * 4, [0.0, jnp.nan, 5.0, jnp.nan], [2.0, 1.0, 0.0, 2.0]]
  )
  np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, -1)))
  assert np.asarray(first_argmax(x)).tolist() == [1, 0, 1, 0]
