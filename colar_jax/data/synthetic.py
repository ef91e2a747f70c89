"""Seeded synthetic multi-step modular-arithmetic task (the CPU demo's default data).

A problem starts from a digit and applies a few operations, each result taken modulo
``modulus``::

    question  x=2;x*3;x-2;x-8;x-7?
    steps     2*3=6   6-2=4   4-8=6   6-7=9
    answer    9

Why this task (see README_DATA.md): the answer is a composition of several
non-commutative modular operations, so a small model can not read it off the question
(measured: ~20% without the chain vs ~99% with it for a 0.6M-param char-level decoder);
steps are short and perfectly regular (5 characters, 6 with the newline joiner), which makes
latent compression factors map cleanly onto whole steps; and it is generated in
milliseconds, deterministically from a seed, with no file on disk.

``max_noop_steps`` > 0 appends ``min_noop_steps``..``max_noop_steps`` redundant steps
restating the value (``9=9``) to a chain (uniform per problem, on ``noop_percent``% of
problems, none on the rest; question and answer unchanged): reasoning that a shorter chain
can drop.
The SFT model learns to stop after a random number of them, which gives GRPO's length
reward something to remove (every sample of a group is otherwise correct and equally long).

Splits are disjoint by question text (test is drawn first, then val, then train, each from
its own seeded stream), so changing ``train_size`` never changes the test set.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from colar_jax import config as cfglib
from colar_jax.data.records import Record

_OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}
SPLITS = ("test", "val", "train")  # generation order; earlier splits claim questions first


@dataclasses.dataclass(frozen=True)
class SyntheticTask(cfglib.Synthetic):
  """The task of a ``config.Synthetic`` section (the parameters and their defaults live
  there) plus what follows from them. Every field is part of the dataset's config name."""

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.operand_min < 0:
      raise ValueError("data.synthetic.operand_min: need 0 <= operand_min")
    if len(set(self.operators)) != len(self.operators):
      raise ValueError("data.synthetic.operators: must not repeat")
    total = self.train_size + self.val_size + self.test_size
    if total > self.num_distinct_problems() // 2:
      raise ValueError(
        f"data.synthetic: {total} problems requested but only {self.num_distinct_problems()} "
        "distinct ones exist; use more steps/operands or smaller splits"
      )

  def num_distinct_problems(self) -> int:
    per_step = len(self.operators) * (self.operand_max - self.operand_min + 1)
    return self.modulus * sum(per_step**k for k in range(self.min_steps, self.max_steps + 1))

  def config_name(self) -> str:
    """A tfds-safe name that changes whenever the generated data would."""
    ops = "-".join(_OP_NAMES[o] for o in self.operators)
    return (
      f"s{self.min_steps}-{self.max_steps}_r{self.operand_min}-{self.operand_max}_{ops}"
      f"_m{self.modulus}_n{self.train_size}-{self.val_size}-{self.test_size}_seed{self.seed}"
      + ("" if self.step_style == "full" else f"_{self.step_style}")  # older names unchanged
      + (f"_noop{self.max_noop_steps}" if self.max_noop_steps else "")
      + (f"min{self.min_noop_steps}" if self.max_noop_steps and self.min_noop_steps else "")
      + (f"p{self.noop_percent}" if self.max_noop_steps and self.noop_percent != 100 else "")
    )

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.train_size, "val": self.val_size, "test": self.test_size}


def apply_op(a: int, op: str, b: int, modulus: int) -> int:
  if op == "+":
    return (a + b) % modulus
  if op == "-":
    return (a - b) % modulus
  if op == "*":
    return (a * b) % modulus
  raise ValueError(f"unknown operator {op!r}")


def make_record(
  x0: int,
  ops: list[tuple[str, int]],
  modulus: int,
  rid: str = "",
  step_style: str = "full",
  noop_steps: int = 0,
) -> Record:
  """The record for a start value and a list of (operator, operand) pairs, its chain
  followed by ``noop_steps`` redundant steps (not in the question)."""
  question = f"x={x0};" + ";".join(f"x{op}{b}" for op, b in ops) + "?"
  steps, value = [], x0
  for op, b in ops:
    new = apply_op(value, op, b, modulus)
    steps.append(f"{value}{op}{b}={new}" if step_style == "full" else f"{op}{b}={new}")
    value = new
  # A redundant step restates the value ("9=9"). It has no operator on purpose: as
  # "9+0=9" it taught a 0.1M-param model that "+" often changes nothing, and its "+"
  # steps went 35% wrong (CoT 100% -> 47%).
  steps += [f"{value}={value}" if step_style == "full" else f"={value}"] * noop_steps
  return Record(question, tuple(steps), str(value), id=rid)


_QUESTION = re.compile(r"x=(\d+);((?:x[-+*]\d+;)*x[-+*]\d+)\?")


def solve_question(question: str, modulus: int, step_style: str = "full") -> Record:
  """Recompute steps and answer from the question text alone (used to verify data)."""
  m = _QUESTION.fullmatch(question)
  if m is None:
    raise ValueError(f"not a synthetic question: {question!r}")
  ops = [(t[1], int(t[2:])) for t in m.group(2).split(";")]
  return make_record(int(m.group(1)), ops, modulus, step_style=step_style)


def _draw(
  task: SyntheticTask, rng: np.random.Generator, n: int
) -> list[tuple[int, list[tuple[str, int]], int]]:
  """n problems as (start, ops, redundant steps)."""
  k_max = task.max_steps
  x0 = rng.integers(0, task.modulus, size=n)
  lengths = rng.integers(task.min_steps, task.max_steps + 1, size=n)
  op_idx = rng.integers(0, len(task.operators), size=(n, k_max))
  operands = rng.integers(task.operand_min, task.operand_max + 1, size=(n, k_max))
  # Drawn last and only when asked, so tasks without no-ops keep their exact data.
  noops = (
    rng.integers(task.min_noop_steps, task.max_noop_steps + 1, size=n)
    if task.max_noop_steps
    else np.zeros(n, int)
  )
  if task.max_noop_steps and task.noop_percent < 100:
    noops = np.where(rng.integers(0, 100, size=n) < task.noop_percent, noops, 0)
  return [
    (
      int(x0[i]),
      [(task.operators[op_idx[i, j]], int(operands[i, j])) for j in range(lengths[i])],
      int(noops[i]),
    )
    for i in range(n)
  ]


def generate_splits(task: SyntheticTask) -> dict[str, list[Record]]:
  """All three splits, deterministic in ``task`` (including its seed), disjoint by question."""
  seen: set[str] = set()
  out: dict[str, list[Record]] = {}
  sizes = task.split_sizes()
  for split_idx, split in enumerate(SPLITS):
    rng = np.random.default_rng([task.seed, split_idx])
    records: list[Record] = []
    while len(records) < sizes[split]:
      for x0, ops, noops in _draw(task, rng, max(64, sizes[split] - len(records))):
        rec = make_record(
          x0,
          ops,
          task.modulus,
          rid=f"synthetic:{split}:{len(records)}",
          step_style=task.step_style,
          noop_steps=noops,
        )
        if rec.question in seen:
          continue
        seen.add(rec.question)
        records.append(rec)
        if len(records) == sizes[split]:
          break
    out[split] = records
  return out
