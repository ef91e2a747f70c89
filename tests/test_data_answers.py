"""Answer extraction and checking (reference semantics; MATH through math-verify)."""

from __future__ import annotations

import pytest

from colar_jax.data.answers import extract_answer, is_correct


@pytest.mark.parametrize(
  ("text", "expected"),
  [
    ("###Answer:72", "72"),
    ("<<48/2=24>>\n<<48+24=72>>###Answer:72", "72"),
    ("Answer:1 ... Answer: 5", "5"),
    ("no marker 42", "no marker 42"),
    ("###Answer:18###", "18"),
  ],
)
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


@pytest.mark.parametrize(
  ("pred", "gold", "ok"),
  [
    ("10.0", "10", True),
    ("1,000", "1000", True),
    ("$18", "18", True),
    ("72.", "72", True),
    (" 0.5 ", ".5", True),
    ("-3", "-3.0", True),
    ("71", "72", False),
    ("72 apples", "72", False),
    ("", "0", False),
    ("nan", "nan", False),
    ("Yes", "yes", True),
  ],
)
def test_number_answers(pred, gold, ok):
  assert is_correct(pred, gold) is ok


@pytest.mark.parametrize(
  ("pred", "gold", "ok"),
  [
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac12", r"\frac{1}{2}", True),
    ("1+x^2", "x^2+1", True),
    (r"\{4, 2, 1\}", r"\{1, 2, 4\}", True),
    ("1.41", r"\sqrt{2}", False),
    ("6", "5", False),
  ],
)
def test_math_answers(pred, gold, ok):
  assert is_correct(pred, gold, kind="math") is ok


def test_unknown_kind():
  with pytest.raises(ValueError):
    is_correct("1", "1", kind="text")  # type: ignore[arg-type]
