"""Training / evaluation batches through grain, from a prepared tfds data source.

Training pipeline (everything is a random-access ``grain.MapDataset`` until the very end,
so the iterator state is a single index and resuming is exact)::

    source[shard_index::shard_count]        per-host shard (disjoint, every epoch the same)
      .map(Record.from_example)             bytes -> Record
      .shuffle(seed)                        a new permutation every epoch (repeat reseeds)
      .batch(batch_size, drop_remainder)    lists of records; batches never cross epochs
      .repeat(num_epochs)                   None = infinite
      .map_with_index(encode)               i = global batch index, epoch = i // batches_per_epoch,
                                            speed = SpeedSampler(i) -> encode_fn(records, speed, epoch)

The speed is drawn from an RNG seeded by ``(seed, batch index)`` only - not by the host -
so every host compresses its slice of a global batch with the same factor, and a resumed
run draws the same speeds. ``encode_fn`` is pluggable (CoLaR / CoT / iCoT / Coconut decide
what to encode, possibly depending on the epoch); :func:`make_sft_encode_fn` is the
default. Batches are dicts of numpy arrays, ready for
``jax.make_array_from_process_local_data``. With several hosts pass ``fixed_shapes=True``
to the encoder: bucket choice is per host and hosts must agree on shapes.

Checkpointing: ``it = pipeline.iterator()``; ``it.get_state()`` is a small dict (JSON-able,
``{"next_index": n}``) and ``it.set_state(state)`` on a fresh iterator continues at the same
batch. Orbax users can save it with ``grain.checkpoint.CheckpointSave(it)`` /
``CheckpointRestore(it)`` (grain 0.2.x), or store the dict in their own metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from colar_jax.data.prompts import (
  Buckets,
  EncodeStats,
  PromptTemplates,
  Speed,
  check_factor_weights,
  encode_sft_batch,
)
from colar_jax.data.records import Record

EncodeFn = Callable[[list[Record], Speed, int], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SpeedSampler:
  """Draw a compression factor from ``factors`` (uniformly, or in proportion to
  ``weights``); show ``auto`` with ``auto_prob``."""

  factors: tuple[int, ...] = (1, 2, 3, 4, 5)
  auto_prob: float = 0.0
  seed: int = 0
  weights: tuple[float, ...] = ()  # empty = uniform

  def __post_init__(self) -> None:
    if not self.factors or any(int(f) < 1 for f in self.factors):
      raise ValueError("factors must be a non-empty list of integers >= 1")
    if not 0.0 <= self.auto_prob <= 1.0:
      raise ValueError("auto_prob must be in [0, 1]")
    object.__setattr__(self, "factors", tuple(int(f) for f in self.factors))
    object.__setattr__(self, "weights", check_factor_weights(self.factors, self.weights))

  def __call__(self, batch_index: int) -> Speed:
    # Stream 1 of the seed: decorrelated from the shuffle, which uses the bare seed.
    rng = np.random.default_rng([self.seed, 1, batch_index])
    if self.weights:  # the uniform branch keeps its draws (and resumed runs) unchanged
      cdf = np.cumsum(self.weights) / sum(self.weights)
      idx = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)
    else:
      idx = int(rng.integers(len(self.factors)))
    factor = self.factors[idx]
    return Speed(factor=factor, auto=bool(rng.random() < self.auto_prob))


@dataclasses.dataclass(frozen=True)
class SftEncoder:
  """The default encoder: :func:`encode_sft_batch` with the drawn speed (epoch unused).

  A picklable class rather than a closure, so the dataset also works with grain's
  multiprocessing prefetch.
  """

  tokenizer: Any
  templates: PromptTemplates
  buckets: Buckets
  fixed_shapes: bool = False
  stats: EncodeStats | None = None

  def __call__(self, records: list[Record], speed: Speed, epoch: int) -> dict[str, np.ndarray]:
    del epoch
    return encode_sft_batch(
      records,
      self.tokenizer,
      self.templates,
      speed,
      self.buckets,
      stats=self.stats,
      fixed_shapes=self.fixed_shapes,
    )


def make_sft_encode_fn(
  tokenizer: Any,
  templates: PromptTemplates,
  buckets: Buckets,
  *,
  fixed_shapes: bool = False,
  stats: EncodeStats | None = None,
) -> EncodeFn:
  """Shorthand for :class:`SftEncoder`."""
  return SftEncoder(tokenizer, templates, buckets, fixed_shapes, stats)


@dataclasses.dataclass(frozen=True)
class _EncodeAt:
  """``map_with_index`` transform: global batch index -> speed draw and epoch."""

  encode_fn: EncodeFn
  sampler: SpeedSampler
  batches_per_epoch: int

  def __call__(self, index: int, records: list[Record]) -> dict[str, np.ndarray]:
    return self.encode_fn(records, self.sampler(index), index // self.batches_per_epoch)


@dataclasses.dataclass(frozen=True)
class TrainPipeline:
  """The training dataset plus what the loop needs to know about it."""

  dataset: grain.MapDataset
  batches_per_epoch: int
  shard_size: int
  read_options: grain.ReadOptions

  def epoch_of(self, batch_index: int) -> int:
    return batch_index // self.batches_per_epoch

  def iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
    """A fresh iterator (background prefetch), optionally restored from ``get_state()``."""
    it = iter(self.dataset.to_iter_dataset(self.read_options))
    if state is not None:
      it.set_state(state)
    return it


def make_train_pipeline(
  source: Sequence[Any],
  *,
  batch_size: int,
  encode_fn: EncodeFn,
  seed: int,
  speed_sampler: SpeedSampler | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  num_threads: int = 1,
  prefetch: int = 4,
) -> TrainPipeline:
  """Shuffled, sharded, batched, encoded, repeated training batches (see module doc).

  ``source``: a tfds data source (:func:`colar_jax.data.builders.load_source`) or any
  sequence of tfds-style examples / :class:`Record` s. ``batch_size`` is PER HOST
  (global batch / ``jax.process_count()``); pass ``shard_index=jax.process_index()`` and
  ``shard_count=jax.process_count()``. ``speed_sampler`` defaults to a fixed speed 1
  (plain CoT).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  sampler = speed_sampler or SpeedSampler(factors=(1,), seed=seed)
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  shard_size = len(ds)
  if shard_size < batch_size:
    raise ValueError(f"shard of {shard_size} examples is smaller than one batch ({batch_size})")
  ds = ds.map(_record)
  ds = ds.shuffle(seed=seed).batch(batch_size, drop_remainder=True, batch_fn=list)
  batches_per_epoch = len(ds)
  ds = ds.repeat(num_epochs)
  return TrainPipeline(
    dataset=ds.map_with_index(_EncodeAt(encode_fn, sampler, batches_per_epoch)),
    batches_per_epoch=batches_per_epoch,
    shard_size=shard_size,
    read_options=grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch),
  )


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """Records of one evaluation batch, padded to ``batch_size`` by repeating the last one.

  ``valid`` marks real rows (count only those); ``indices`` are positions in the split.
  """

  records: list[Record]
  valid: np.ndarray
  indices: np.ndarray


def eval_batches(
  source: Sequence[Any],
  batch_size: int,
  *,
  shard_index: int = 0,
  shard_count: int = 1,
  limit: int | None = None,
) -> Iterator[EvalBatch]:
  """In-order, unshuffled batches of a split; every host yields the same number of batches.

  Host ``h`` takes the contiguous slice ``[h*k, (h+1)*k)`` with ``k = ceil(n/shard_count)``
  so that lock-stepped multi-host evaluation never deadlocks on a missing last batch.
  """
  n = len(source) if limit is None else min(limit, len(source))
  per_host = -(-n // shard_count)
  start, stop = shard_index * per_host, min(n, (shard_index + 1) * per_host)
  n_batches = -(-per_host // batch_size)
  for b in range(n_batches):
    idx = list(range(start + b * batch_size, min(stop, start + (b + 1) * batch_size)))
    valid = np.zeros((batch_size,), dtype=bool)
    valid[: len(idx)] = True
    if not idx:  # this host ran out; still yield so all hosts step together
      idx = [n - 1] if n else []
      valid[:] = False
    recs = [_record(source[i]) for i in idx]
    pad = batch_size - len(recs)
    yield EvalBatch(
      records=recs + [recs[-1]] * pad,
      valid=valid,
      indices=np.asarray(idx + [idx[-1]] * pad, dtype=np.int64),
    )


def _record(ex: Any) -> Record:
  return ex if isinstance(ex, Record) else Record.from_example(ex)
