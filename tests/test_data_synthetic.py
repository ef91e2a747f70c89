"""The synthetic chain task: determinism, correctness of every step, disjoint splits."""

from __future__ import annotations

import dataclasses
import re

import pytest

from colar_jax.data.synthetic import (
  SyntheticTask,
  apply_op,
  generate_splits,
  make_record,
  solve_question,
)

SMALL = SyntheticTask(train_size=600, val_size=100, test_size=100, seed=3)


def test_the_documented_example():
  rec = make_record(2, [("*", 3), ("-", 2), ("-", 8), ("-", 7)], 10)
  assert rec.question == "x=2;x*3;x-2;x-8;x-7?"
  assert rec.steps == ("2*3=6", "6-2=4", "4-8=6", "6-7=9")
  assert rec.answer == "9"


def test_short_step_style_drops_the_left_operand():
  rec = make_record(2, [("*", 3), ("-", 2), ("-", 8), ("-", 7)], 10, step_style="short")
  assert rec.steps == ("*3=6", "-2=4", "-8=6", "-7=9") and rec.answer == "9"
  short = dataclasses.replace(SMALL, step_style="short")
  assert short.config_name() == SMALL.config_name() + "_short"  # full keeps its old name
  full, shrt = generate_splits(SMALL)["test"], generate_splits(short)["test"]
  assert [r.question for r in full] == [r.question for r in shrt]
  assert all(s.steps == solve_question(s.question, 10, "short").steps for s in shrt[:50])
  assert _task_of("data.synthetic.step_style=short").step_style == "short"
  with pytest.raises(ValueError, match="step_style"):
    SyntheticTask(step_style="terse")


def test_deterministic_for_a_seed_and_different_across_seeds():
  a, b = generate_splits(SMALL), generate_splits(SMALL)
  assert a == b
  c = generate_splits(dataclasses.replace(SMALL, seed=4))
  assert [r.question for r in c["train"]] != [r.question for r in a["train"]]


def test_test_split_does_not_depend_on_train_size():
  bigger = generate_splits(dataclasses.replace(SMALL, train_size=900))
  assert bigger["test"] == generate_splits(SMALL)["test"]


def test_steps_recompute_and_answer_is_last_result():
  splits = generate_splits(SMALL)
  assert {k: len(v) for k, v in splits.items()} == {"train": 600, "val": 100, "test": 100}
  step_re = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")
  for rec in (r for recs in splits.values() for r in recs):
    assert len(rec.steps) == 4
    prev = int(rec.question[2 : rec.question.index(";")])
    for step in rec.steps:
      a, op, b, c = step_re.fullmatch(step).groups()
      assert int(a) == prev and int(c) == apply_op(int(a), op, int(b), 10)
      prev = int(c)
    assert rec.answer == rec.steps[-1].split("=")[1] == str(prev)
    assert solve_question(rec.question, 10) == dataclasses.replace(rec, id="")


def test_splits_are_disjoint():
  splits = generate_splits(SMALL)
  qs = [set(r.question for r in recs) for recs in splits.values()]
  assert sum(len(q) for q in qs) == len(set().union(*qs)) == 800


def test_variable_steps_and_modulus():
  task = SyntheticTask(
    min_steps=2, max_steps=6, modulus=97, operand_max=50, train_size=300, val_size=0, test_size=0
  )
  recs = generate_splits(task)["train"]
  assert {len(r.steps) for r in recs} == {2, 3, 4, 5, 6}
  assert all(0 <= int(r.answer) < 97 for r in recs)
  assert all(solve_question(r.question, 97).answer == r.answer for r in recs)


def test_config_name_and_validation():
  assert SyntheticTask().config_name() == "s4-4_r1-9_add-sub-mul_m10_n20000-500-500_seed1234"
  assert SyntheticTask(seed=0).config_name() == "s4-4_r1-9_add-sub-mul_m10_n20000-500-500_seed0"
  with pytest.raises(ValueError, match="distinct"):
    SyntheticTask(min_steps=1, max_steps=1, train_size=1000)
  with pytest.raises(ValueError, match="operators"):
    SyntheticTask(operators="/")
  with pytest.raises(ValueError, match="operators: must not repeat"):
    SyntheticTask(operators="++")


def test_redundant_noop_steps_follow_the_real_chain():
  rec = make_record(2, [("*", 3), ("-", 2)], 10, noop_steps=2)
  assert rec.question == "x=2;x*3;x-2?" and rec.answer == "4"
  assert rec.steps == ("2*3=6", "6-2=4", "4=4", "4=4")
  assert make_record(2, [("*", 3)], 10, step_style="short", noop_steps=1).steps == ("*3=6", "=6")
  task = dataclasses.replace(SMALL, max_noop_steps=2)
  assert task.config_name() == SMALL.config_name() + "_noop2"  # 0 keeps the old name
  plain, noisy = generate_splits(SMALL)["test"], generate_splits(task)["test"]
  assert [r.question for r in plain] == [r.question for r in noisy]
  assert [r.answer for r in plain] == [r.answer for r in noisy]
  tails = [len(n.steps) - len(p.steps) for p, n in zip(plain, noisy)]
  assert set(tails) == {0, 1, 2}  # uniform over 0..k (100 draws)
  for p, n in zip(plain, noisy):
    assert n.steps[: len(p.steps)] == p.steps
    assert all(s == f"{p.answer}={p.answer}" for s in n.steps[len(p.steps) :])
  assert _task_of("data.synthetic.max_noop_steps=3").max_noop_steps == 3
  rare = dataclasses.replace(task, noop_percent=20, test_size=400, train_size=300)
  assert rare.config_name().endswith("_noop2p20")
  tails = [len(r.steps) - 4 for r in generate_splits(rare)["test"]]
  assert set(tails) == {0, 1, 2} and 0.05 < sum(t > 0 for t in tails) / len(tails) < 0.25
  # min_noop_steps: a problem either gets 2..2 redundant steps (on ~75%) or none.
  pair = dataclasses.replace(task, min_noop_steps=2, noop_percent=75, test_size=400, train_size=300)
  assert pair.config_name() == SMALL.config_name().replace("n600-100-100", "n300-100-400") + (
    "_noop2min2p75"
  )
  tails = [len(r.steps) - 4 for r in generate_splits(pair)["test"]]
  assert set(tails) == {0, 2} and 0.65 < sum(t > 0 for t in tails) / len(tails) < 0.85
  with pytest.raises(ValueError, match="min_noop_steps"):
    SyntheticTask(min_noop_steps=3, max_noop_steps=2)
  with pytest.raises(ValueError, match="noop_percent"):
    SyntheticTask(max_noop_steps=1, noop_percent=101)
  with pytest.raises(ValueError, match="max_noop_steps"):
    SyntheticTask(max_noop_steps=-1)


def _task_of(override: str) -> SyntheticTask:
  """The task a run gets from a ``--config.data.synthetic.*`` override."""
  from colar_jax import config
  from colar_jax.data.builders import synthetic_task

  run = config.from_config_dict(config.apply_overrides(config.base_config(), [override]))
  return synthetic_task(run.data.synthetic)
