"""Grain training pipeline: round trip, epochs, resume, bounded shapes, speed draws, sharding."""

from __future__ import annotations

from collections import Counter

import grain
import numpy as np
import pytest
from etils import epath

from colar_jax.data import builders
from colar_jax.data.pipeline import (
  SpeedSampler,
  eval_batches,
  make_sft_encode_fn,
  make_train_pipeline,
)
from colar_jax.data.prompts import (
  Buckets,
  PromptTemplates,
  char_tokenizer_corpus,
  train_char_tokenizer,
)
from colar_jax.data.records import Record
from colar_jax.data.synthetic import SyntheticTask

TASK = SyntheticTask(min_steps=2, max_steps=6, train_size=203, val_size=10, test_size=30, seed=1)
T = PromptTemplates()
BUCKETS = Buckets(question=(48, 64, 96), steps=(16, 24, 32, 48), answer=(16,))
SAMPLER = SpeedSampler(factors=(1, 2, 3, 4, 5), auto_prob=0.3, seed=7)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  cfg = builders.synthetic_config(TASK)
  builders.prepare("synthetic", data_dir, config=cfg)
  train = builders.load_source("synthetic", data_dir, "train", config=cfg)
  test = builders.load_source("synthetic", data_dir, "test", config=cfg)
  recs = [Record.from_example(train[i]) for i in range(len(train))]
  tok = train_char_tokenizer(char_tokenizer_corpus(recs), tmp_path_factory.mktemp("tok"))
  return {"train": train, "test": test, "recs": recs, "tok": tok}


def pipeline(env, batch_size=8, shard_index=0, shard_count=1, encode_fn=None, seed=3):
  return make_train_pipeline(
    env["train"],
    batch_size=batch_size,
    encode_fn=encode_fn or make_sft_encode_fn(env["tok"], T, BUCKETS),
    seed=seed,
    speed_sampler=SAMPLER,
    shard_index=shard_index,
    shard_count=shard_count,
  )


def questions(tok, batch) -> list[str]:
  out = []
  for ids, mask in zip(batch["question_ids"], batch["question_mask"], strict=True):
    text = tok.decode(ids[mask.astype(bool)].tolist())
    out.append(text.split("Question: ")[1].split(" Let's think")[0])
  return out


def test_one_epoch_is_a_permutation_and_epochs_reshuffle(env):
  p = pipeline(env)
  assert (p.batches_per_epoch, p.shard_size) == (25, 203)  # 203 // 8, remainder dropped
  it = p.iterator()
  epoch0 = [q for _ in range(25) for q in questions(env["tok"], next(it))]
  epoch1 = [q for _ in range(25) for q in questions(env["tok"], next(it))]
  all_q = {r.question for r in env["recs"]}
  assert len(set(epoch0)) == len(epoch0) == 200 and set(epoch0) <= all_q
  assert len(set(epoch1)) == 200 and epoch0 != epoch1


def test_encode_fn_gets_epoch_and_speed(env):
  seen: list[tuple[int, int, bool]] = []

  def encode(records, speed, epoch):
    seen.append((epoch, speed.factor, speed.auto))
    return {"n": np.full((len(records),), epoch, np.int32)}

  p = pipeline(env, batch_size=50, encode_fn=encode)  # 4 batches per epoch
  ds = p.dataset
  assert [int(ds[i]["n"][0]) for i in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
  assert [p.epoch_of(i) for i in (0, 3, 4, 8)] == [0, 0, 1, 2]
  assert [(f, a) for _, f, a in seen] == [(SAMPLER(i).factor, SAMPLER(i).auto) for i in range(9)]


def assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("k", [5, 24])  # mid-epoch, and just before an epoch boundary
def test_resume_from_iterator_state(env, k):
  it = pipeline(env).iterator()
  for _ in range(k):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline(env).iterator(state)  # a fresh pipeline, as after a restart
  for e in expected:
    assert_same(next(resumed), e)


def test_grain_checkpoint_handler_round_trip(env, tmp_path):
  it = pipeline(env).iterator()
  for _ in range(7):
    next(it)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = next(it)
  fresh = pipeline(env).iterator()
  grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=fresh)
  assert_same(next(fresh), expected)


def test_bucket_lengths_bound_the_shapes(env):
  it = pipeline(env, batch_size=4).iterator()
  shapes = {"question": set(), "steps": set(), "answer": set()}
  for _ in range(150):  # three epochs
    b = next(it)
    for part in shapes:
      shapes[part].add(b[f"{part}_ids"].shape)
      assert b[f"{part}_ids"].shape == b[f"{part}_mask"].shape
  assert {s[1] for s in shapes["question"]} <= set(BUCKETS.question)
  assert {s[1] for s in shapes["answer"]} == {16}
  steps_lengths = {s[1] for s in shapes["steps"]}
  assert steps_lengths <= set(BUCKETS.steps) and len(steps_lengths) >= 2  # bucketing really varies
  assert all(s[0] == 4 for part in shapes.values() for s in part)


def test_speed_draws_are_reproducible_and_in_range(env):
  draws = [SAMPLER(i) for i in range(3000)]
  assert draws == [
    SpeedSampler(factors=(1, 2, 3, 4, 5), auto_prob=0.3, seed=7)(i) for i in range(3000)
  ]
  assert {d.factor for d in draws} == {1, 2, 3, 4, 5}
  assert 0.26 < np.mean([d.auto for d in draws]) < 0.34
  assert draws != [
    SpeedSampler(factors=(1, 2, 3, 4, 5), auto_prob=0.3, seed=8)(i) for i in range(3000)
  ]
  it = pipeline(env).iterator()
  for i in range(10):
    b = next(it)
    assert (b["speed"] == SAMPLER(i).code).all() and (
      b["compression_factor"] == SAMPLER(i).factor
    ).all()
  with pytest.raises(ValueError):
    SpeedSampler(factors=(0, 1))


def test_weighted_speed_draws_follow_the_weights():
  s = SpeedSampler(factors=(1, 2, 5), weights=(1, 1, 2), seed=3)
  counts = Counter(s(i).factor for i in range(4000))
  assert abs(counts[5] / 4000 - 0.5) < 0.03 and abs(counts[1] / 4000 - 0.25) < 0.03
  assert [s(i) for i in range(50)] == [
    SpeedSampler(factors=(1, 2, 5), weights=(1, 1, 2), seed=3)(i) for i in range(50)
  ]
  assert Counter(SpeedSampler(factors=(1, 2), weights=(0, 1))(i).factor for i in range(200)) == {
    2: 200
  }
  for bad in ((1, 1), (1, -1, 1), (0, 0, 0)):
    with pytest.raises(ValueError, match="weights"):
      SpeedSampler(factors=(1, 2, 5), weights=bad)


def test_shards_are_disjoint_and_draw_the_same_speeds(env):
  p0, p1 = (
    pipeline(env, batch_size=10, shard_index=0, shard_count=2),
    pipeline(env, batch_size=10, shard_index=1, shard_count=2),
  )
  assert (p0.shard_size, p1.shard_size) == (
    102,
    101,
  ) and p0.batches_per_epoch == p1.batches_per_epoch == 10
  it0, it1 = p0.iterator(), p1.iterator()
  q0, q1 = set(), set()
  for _ in range(10):
    b0, b1 = next(it0), next(it1)
    assert (b0["compression_factor"] == b1["compression_factor"]).all() and (
      b0["speed"] == b1["speed"]
    ).all()
    q0.update(questions(env["tok"], b0))
    q1.update(questions(env["tok"], b1))
  assert len(q0) == len(q1) == 100 and not q0 & q1


def test_eval_batches_cover_the_split_once_with_equal_host_counts(env):
  per_host = [list(eval_batches(env["test"], 8, shard_index=h, shard_count=2)) for h in range(2)]
  assert [len(b) for b in per_host] == [2, 2]
  indices = [int(i) for host in per_host for b in host for i in b.indices[b.valid]]
  assert sorted(indices) == list(range(30))
  last = per_host[1][-1]
  assert last.valid.tolist() == [True] * 7 + [False] and len(last.records) == 8
  assert last.records[0] == Record.from_example(env["test"][int(last.indices[0])])
  # 30 examples over 16 hosts: 2 each, the last host has none but still yields one batch.
  empty = list(eval_batches(env["test"], 8, shard_index=15, shard_count=16))
  assert len(empty) == 1 and not empty[0].valid.any() and len(empty[0].records) == 8


def test_a_plain_list_of_records_is_a_valid_source(env):
  recs = env["recs"][:40]
  p = make_train_pipeline(
    recs, batch_size=8, encode_fn=make_sft_encode_fn(env["tok"], T, BUCKETS), seed=0
  )
  got = {q for i in range(5) for q in questions(env["tok"], p.dataset[i])}
  assert got == {r.question for r in recs}
  assert (p.dataset[0]["speed"] == 1).all()  # no sampler: plain CoT speed 1
