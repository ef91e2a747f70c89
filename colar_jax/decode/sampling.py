"""Token sampling: temperature, top-k, nucleus (top-p) and greedy, one PRNG key per row.

Kept apart from the rollout so the filters can be unit-tested on hand-made
distributions. Semantics follow HF ``generate`` (the reference decodes with it, and its
defaults are top-k 50 and, in the reference's configs, top-p 0.9): temperature first,
then top-k keeps the ``k`` most likely tokens, then top-p keeps, WITHIN those, the
smallest set of most likely tokens whose renormalised mass is >= p (the top token is
always kept, so p -> 0 degenerates to greedy), then one token is drawn from the
renormalised set.

Ties (equal logits) are broken towards the lower token id at both boundaries, so the
kept set always has exactly ``min(k, V)`` / the minimal nucleus size. HF differs only
on exact ties: its top-k keeps every token tied with the k-th (more than k), and its
top-p order among equal logits is that of an unstable sort.

Cost: with ``k < V`` the filter works on the ``[B, k]`` output of ``lax.top_k`` (no
sort of the vocabulary, no inverse permutation) and the draw is a categorical over
those ``k`` entries mapped back through their indices. With ``k >= V`` (or top-k off)
the sampler is the full-vocabulary one it always was (stable sort, inverse permutation,
categorical over the masked ``[B, V]`` logits), so small vocabularies -- the embedded
demo's ~30 characters -- draw bit-identical tokens with the same keys as before top-k
existed.

Rows take their own key (``keys`` has a leading batch axis) so that a row's draw
depends only on its key and its logits, never on which other rows share the batch:
this is what makes rollouts batch-invariant (see ``rollout.py``).

:func:`categorical` is ``vmap(jax.random.categorical)`` computed faster on CPU, draw for
draw the same (tested bit-identical): the same Gumbel-max trick, but the arg-max as a max
and a first-index-of-the-max (XLA:CPU runs ``jnp.argmax``'s variadic reduce ~3x slower
than the Gumbel noise itself), the threefry rounds unrolled (JAX's CPU lowering rolls them
into a loop that materialises every round) and a lone row split in two (see there). It
falls back to ``jax.random.categorical`` for other PRNGs, key layouts or Gumbel modes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32, 20 rounds (Salmon et al.)


def _threefry_2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> list:
  """Threefry-2x32 hash of the counters (x1, x2) under key (k1, k2), rounds unrolled."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r)))
    x[0] = x[0] + ks[(i + 1) % 3]
    x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x


def _fast_threefry(keys: jax.Array) -> bool:
  """Whether ``jax.random.bits`` is the layout :func:`categorical` recomputes: partitionable
  threefry hashes counter (0, i) for element i and returns the xor of the two words."""
  return bool(jax.config.jax_threefry_partitionable) and (
    str(jax.random.key_impl(keys)) == "threefry2x32"
  )


def first_argmax(x: jax.Array) -> jax.Array:
  """``jnp.argmax(x, -1)`` (the first maximum; the first NaN if any) as two plain passes."""
  top = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row has one
  hit = (x == top) | jnp.isnan(x)
  n = x.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """``vmap(jax.random.categorical)(keys, logits)``, same draws: [B] keys, [B, V] -> [B]."""
  if (
    jax.config.jax_high_dynamic_range_gumbel
    or logits.dtype != jnp.float32
    or not _fast_threefry(keys)
  ):
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
  b, n = logits.shape
  # XLA:CPU runs a [1, n] elementwise fusion ~8x slower per element than a [2, n / 2]
  # one (measured at n = 49153), so a lone long row is drawn as two halves of its counters.
  parts = 2 if b == 1 and n >= 2048 else 1
  width = -(-n // parts)
  data = jnp.repeat(jax.random.key_data(keys), parts, axis=0)  # [b * parts, 2] uint32
  counter = jnp.arange(parts * width, dtype=jnp.uint32).reshape(parts, width)
  counter = jnp.tile(counter, (b, 1))
  hi, lo = _threefry_2x32(data[:, :1], data[:, 1:], jnp.zeros_like(counter), counter)
  bits = hi ^ lo  # == jax.random.bits(key, (n,), uint32) per row, element for element
  # jax.random.uniform(minval=tiny, maxval=1) from the 32 bits, op for op, then the
  # "low" mode Gumbel of jax.random.gumbel.
  tiny = np.float32(np.finfo(np.float32).tiny)
  one = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
  u = jax.lax.max(tiny, (one - np.float32(1.0)) * (np.float32(1.0) - tiny) + tiny)
  shifted = jnp.pad(logits, ((0, 0), (0, parts * width - n)), constant_values=-jnp.inf)
  noisy = -jnp.log(-jnp.log(u)) + shifted.reshape(b * parts, width)
  return first_argmax(noisy.reshape(b, parts * width))


def _nucleus_of_sorted(sorted_logits: jax.Array, top_p: float) -> jax.Array:
  """Keep-mask of descending-sorted logits: the mass ranked strictly above is < top_p."""
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = mass_before < top_p
  return keep.at[..., 0].set(True)


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
  """Bool mask of the nucleus of ``softmax(logits)`` along the last axis (full vocabulary).

  A token is kept iff the probability mass of the tokens ranked strictly above
  it is < ``top_p``; i.e. tokens are added in descending order until the kept
  mass first reaches ``top_p``. The top-ranked token is always kept. Ties are
  broken by the stable sort order (lower token id first), so the kept set has
  exactly the minimal size even when probabilities tie at the boundary.
  """
  logits = logits.astype(jnp.float32)
  order = jnp.argsort(-logits, axis=-1, stable=True)  # descending
  keep_sorted = _nucleus_of_sorted(jnp.take_along_axis(logits, order, axis=-1), top_p)
  # Scatter back to vocabulary order: inverse permutation of ``order``.
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def effective_top_k(top_k: int, vocab_size: int) -> int:
  """The k the filter uses: ``top_k`` clipped to the vocabulary; 0 (off) = the vocabulary."""
  return vocab_size if top_k <= 0 else min(int(top_k), vocab_size)


def top_k_top_p(logits: jax.Array, top_k: int, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """``(values, indices)`` [..., k] of the top-k, descending, with the tokens outside the
  nucleus (computed over the top-k's renormalised distribution) set to -inf."""
  k = effective_top_k(top_k, logits.shape[-1])
  values, indices = jax.lax.top_k(logits.astype(jnp.float32), k)
  if top_p < 1.0:
    values = jnp.where(_nucleus_of_sorted(values, top_p), values, -jnp.inf)
  return values, indices


def filter_logits(
  logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k, then top-p, set to -inf.

  Full-vocabulary form (what the sampler draws from, up to renormalisation); the
  sampler itself only builds it when ``top_k`` does not cut the vocabulary.
  """
  scaled = logits.astype(jnp.float32) / max(float(temperature), 1e-6)
  v = scaled.shape[-1]
  if effective_top_k(top_k, v) < v:
    values, indices = top_k_top_p(scaled, top_k, top_p)
    out = jnp.full_like(scaled, -jnp.inf)
    return jnp.put_along_axis(out, indices, values, axis=-1, inplace=False)
  if top_p >= 1.0:
    return scaled
  return jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)


def sample_tokens(
  keys: jax.Array,
  logits: jax.Array,
  *,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  greedy: bool = False,
) -> jax.Array:
  """One token per row. ``keys`` [B] (one PRNG key per row), ``logits`` [B, V] -> [B] int32.

  ``greedy`` or ``temperature == 0`` takes the argmax (keys unused). All knobs
  are Python constants (static under jit), so each setting compiles its own
  specialised sampler and the greedy path carries no sort.
  """
  if greedy or temperature <= 0.0:
    return first_argmax(logits).astype(jnp.int32)
  v = logits.shape[-1]
  if effective_top_k(top_k, v) >= v:  # the full-vocabulary sampler (see module doc)
    return categorical(keys, filter_logits(logits, temperature, top_p))
  scaled = logits.astype(jnp.float32) / max(float(temperature), 1e-6)
  values, indices = top_k_top_p(scaled, top_k, top_p)
  slot = categorical(keys, values)
  return jnp.take_along_axis(indices, slot[:, None], axis=-1)[:, 0].astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token] per row, of the UNtempered distribution.

  This is the policy's own log-probability, which is what an RL loss recomputes
  with a teacher-forced forward (the reference scores with plain log_softmax,
  independent of the sampling temperature / top-p used to draw the token).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
