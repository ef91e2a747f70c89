"""CoLaR chain compression (paper Sec. 3.1), vectorised with static shapes.

The reasoning chain of a row is ``###`` followed by the step tokens. With a
compression factor ``c`` the chain becomes a sequence of *compressed
positions*: ``###`` alone first, then consecutive blocks of ``c`` real tokens,
the last block possibly shorter. Each compressed embedding is the sum of its
block's token embeddings divided by ``sqrt(#real)`` (default) or ``#real``.

Layout (why it is a per-row shift). The reference builds the grouping with a
per-example Python loop that pads each row so that its left padding is
``c - 1 (mod c)``. Here the same grouping is one gather with static shapes:

* ``Tc = 1 + ceil((T - 1) / c)`` compressed slots hold any chain of ``<= T``
  tokens (``T`` = padded chain length, a bucket); it depends only on ``(T, c)``,
  so the train step compiles once per (bucket, c).
* Row ``b`` with ``n_b`` real tokens needs ``m_b = 1 + ceil((n_b - 1) / c)``
  slots and is RIGHT-aligned in the ``Tc`` slots (compressed chains stay left
  padded, contiguous with the answer that follows, so the next embedding of the
  last compressed position is always the answer's first one).
* Flatten the ``Tc`` slots into ``Tc * c`` sub-slots. Sub-slot ``i`` of row ``b``
  holds real token number ``k = i - (Tc - m_b) * c - (c - 1)`` when
  ``0 <= k < n_b`` (``k = 0`` is ``###``, which lands in the LAST sub-slot of
  its slot, alone). ``k`` is ``i`` minus a per-row constant: a left shift.
* Real token ``k`` is found with a stable argsort of the padding flags, so any
  padding pattern (left, right, holes) groups the same real tokens.

``c = 1`` is the identity on a left-padded chain (``Tc = T``, shift 0).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


def num_compressed_slots(chain_len: int, c: int) -> int:
  """Static number of compressed slots for a padded chain of ``chain_len`` tokens."""
  if c < 1:
    raise ValueError(f"compression factor must be >= 1, got {c}")
  if chain_len <= 0:
    return 0
  return 1 + -(-(chain_len - 1) // c)


def chain_layout(mask: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
  """Where every sub-slot of the compressed chain reads from.

  Args:
    mask: [B, T] real-token mask of the chain (``###`` + steps), any padding.
    c: compression factor (static).

  Returns:
    src: [B, Tc, c] int32 chain index each sub-slot gathers (clipped; only
      meaningful where ``valid``).
    valid: [B, Tc, c] bool, the sub-slot holds a real token.
  """
  b, t = mask.shape
  tc = num_compressed_slots(t, c)
  mask = mask.astype(bool)
  n = mask.sum(-1).astype(jnp.int32)  # [B]
  m = jnp.where(n > 0, 1 + (n - 1 + c - 1) // c, 0)  # compressed slots per row
  i = jnp.arange(tc * c, dtype=jnp.int32)[None]  # [1, Tc*c]
  k = i - ((tc - m) * c + (c - 1))[:, None]  # rank of the real token (per-row shift)
  valid = (k >= 0) & (k < n[:, None])
  # order[b, r] = chain index of row b's r-th real token (stable: keeps token order).
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  src = jnp.take_along_axis(order, jnp.clip(k, 0, max(t - 1, 0)), axis=-1)
  return src.reshape(b, tc, c), valid.reshape(b, tc, c)


@flax.struct.dataclass
class CompressedChain:
  embeds: jax.Array  # [B, Tc, D] compressed embeddings (compute dtype)
  mask: jax.Array  # [B, Tc] bool: slot holds >= 1 real token
  labels: jax.Array  # [B, Tc] int32: the CE label of each slot (one real token)
  label_src: jax.Array  # [B, Tc] int32: chain index the label came from
  count: jax.Array  # [B, Tc] int32: real tokens in the slot
  src: jax.Array  # [B, Tc, c] layout (see chain_layout)
  valid: jax.Array  # [B, Tc, c]


def compress_chain(
  embed_fn: Callable[[jax.Array], jax.Array],
  ids: jax.Array,
  mask: jax.Array,
  c: int,
  *,
  key: jax.Array | None,
  sqrt_mean: bool = True,
  random_label: bool = True,
) -> CompressedChain:
  """Paper Eq. (compression): e_j = sum_{t in block j} E[x_t] / sqrt(|block j|).

  Args:
    embed_fn: token ids [..] -> embeddings [.., D] (the LM's input embedding).
    ids, mask: [B, T] chain tokens (``###`` + steps) and their real-token mask.
    c: compression factor (static).
    key: PRNG key for the random label choice (unused when ``random_label`` off).
    sqrt_mean: divide by sqrt(count) (CoLaR) instead of count (ablation MP).
    random_label: the CE label of a slot is one of its real tokens drawn
      uniformly (CoLaR). Off (ablation): the FIRST real token of the block, i.e.
      the token that plain next-token prediction would target at that point.
  """
  src, valid = chain_layout(mask, c)
  b, tc, _ = src.shape
  flat = src.reshape(b, tc * c)
  g_ids = jnp.take_along_axis(ids, flat, axis=-1).reshape(b, tc, c)
  emb = embed_fn(g_ids)  # [B, Tc, c, D]
  out_dtype = emb.dtype
  emb = jnp.where(valid[..., None], emb.astype(jnp.float32), 0.0)
  count = valid.sum(-1).astype(jnp.int32)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  denom = jnp.sqrt(denom) if sqrt_mean else denom
  embeds = (emb.sum(2) / denom[..., None]).astype(out_dtype)
  # Real sub-slots of a block are contiguous: label sub-slot = first real + offset.
  first = jnp.argmax(valid, axis=-1).astype(jnp.int32)
  if random_label and c > 1:
    if key is None:
      raise ValueError("compress_chain: random_label needs a PRNG key")
    offset = jax.random.randint(key, (b, tc), 0, jnp.maximum(count, 1))
  else:
    offset = jnp.zeros((b, tc), jnp.int32)
  sub = jnp.clip(first + offset, 0, c - 1)[..., None]
  labels = jnp.take_along_axis(g_ids, sub, axis=-1)[..., 0]
  label_src = jnp.take_along_axis(src, sub, axis=-1)[..., 0]
  return CompressedChain(
    embeds=embeds,
    mask=count > 0,
    labels=labels.astype(jnp.int32),
    label_src=label_src,
    count=count,
    src=src,
    valid=valid,
  )
