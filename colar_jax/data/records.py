"""The one record type every dataset is reduced to, and the error bad input raises.

Every source format (GSM8k jsonl, iCoT text, SVAMP/MultiArith JSON lists, MATH trees,
the synthetic generator) is parsed into :class:`Record` so that prompting, tokenization
and the grain pipeline never need to know where an example came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class DataFormatError(ValueError):
  """A malformed source line/record.

  The message is always one line, ``"<file>:<line>: <what is wrong>"``, so a failed
  preparation points straight at the offending input.
  """


@dataclasses.dataclass(frozen=True)
class Record:
  """One question / reasoning chain / answer triple.

  Attributes:
    question: the problem text, never empty.
    steps: the reasoning chain, one string per step (may be empty for the few
      GSM8k test problems whose solutions have no calculator annotation).
    answer: the gold final answer as text (numbers normalised, no thousands commas).
    id: where the record came from (``file:line`` or a generator index); handy in logs.
    extras: dataset specific string fields (MATH ``level``/``type``).
  """

  question: str
  steps: tuple[str, ...]
  answer: str
  id: str = ""
  extras: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def to_example(self, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dict a tfds builder yields (features: question, steps, answer, id, extras)."""
    ex: dict[str, Any] = {
      "question": self.question,
      "steps": list(self.steps),
      "answer": self.answer,
      "id": self.id,
    }
    for k in extra_keys:
      ex[k] = self.extras.get(k, "")
    return ex

  @classmethod
  def from_example(cls, ex: Mapping[str, Any]) -> Record:
    """Inverse of :meth:`to_example` for what a tfds data source returns (bytes)."""

    def text(v: Any) -> str:
      return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    core = {"question", "steps", "answer", "id"}
    return cls(
      question=text(ex["question"]),
      steps=tuple(text(s) for s in ex["steps"]),
      answer=text(ex["answer"]),
      id=text(ex.get("id", "")),
      extras={k: text(v) for k, v in ex.items() if k not in core},
    )
