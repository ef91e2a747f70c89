"""Token sampling: temperature, nucleus (top-p) and greedy, one PRNG key per row.

Kept apart from the rollout so the nucleus rule can be unit-tested on a hand-made
distribution. Semantics follow HF ``generate`` (the reference decodes with it):
temperature is applied first, then top-p keeps the smallest set of most likely
tokens whose probability mass is >= p (the top token is always kept, so p -> 0
degenerates to greedy), then one token is drawn from the renormalised set.

Rows take their own key (``keys`` has a leading batch axis) so that a row's draw
depends only on its key and its logits, never on which other rows share the batch:
this is what makes rollouts batch-invariant (see ``rollout.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
  """Bool mask of the nucleus of ``softmax(logits)`` along the last axis.

  A token is kept iff the probability mass of the tokens ranked strictly above
  it is < ``top_p``; i.e. tokens are added in descending order until the kept
  mass first reaches ``top_p``. The top-ranked token is always kept. Ties are
  broken by the stable sort order (lower token id first), so the kept set has
  exactly the minimal size even when probabilities tie at the boundary.
  """
  logits = logits.astype(jnp.float32)
  order = jnp.argsort(-logits, axis=-1, stable=True)  # descending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Scatter back to vocabulary order: inverse permutation of ``order``.
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
  """Temperature-scaled logits with everything outside the nucleus set to -inf."""
  scaled = logits.astype(jnp.float32) / max(float(temperature), 1e-6)
  if top_p >= 1.0:
    return scaled
  return jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)


def sample_tokens(
  keys: jax.Array,
  logits: jax.Array,
  *,
  temperature: float = 1.0,
  top_p: float = 1.0,
  greedy: bool = False,
) -> jax.Array:
  """One token per row. ``keys`` [B] (one PRNG key per row), ``logits`` [B, V] -> [B] int32.

  ``greedy`` or ``temperature == 0`` takes the argmax (keys unused). All knobs
  are Python constants (static under jit), so each setting compiles its own
  specialised sampler and the greedy path carries no sort.
  """
  if greedy or temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_p)
  draw = jax.vmap(lambda k, l: jax.random.categorical(k, l))
  return draw(keys, filtered).astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token] per row, of the UNtempered distribution.

  This is the policy's own log-probability, which is what an RL loss recomputes
  with a teacher-forced forward (the reference scores with plain log_softmax,
  independent of the sampling temperature / top-p used to draw the token).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
