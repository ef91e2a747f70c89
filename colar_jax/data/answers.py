"""Extracting the final answer from generated text and checking it against the gold answer.

Semantics follow the reference CoLaR evaluation:
  * the answer is whatever follows the LAST ``"Answer:"`` in the decoded output, after
    stripping ``#`` from both ends (the thinking separator ``###`` may precede it);
  * numbers are compared after stripping whitespace / ``#`` / a trailing ``.``, removing
    thousands commas (and, here, ``$``), lower-casing, then comparing as floats when both
    parse (so ``10.0 == 10`` and ``1,000 == 1000``), else as strings;
  * MATH answers are compared with ``math-verify`` (symbolic equivalence of the parsed
    LaTeX), wrapping bare answers in ``$...$`` so its LaTeX extractor sees them.
"""

from __future__ import annotations

import threading
from typing import Literal

AnswerKind = Literal["number", "math"]


def extract_answer(text: str, answer_prefix: str = "Answer:") -> str:
  """The text after the last ``answer_prefix`` (the whole text when it is absent)."""
  return text.strip("#").split(answer_prefix)[-1].strip()


def normalize_number_text(text: str) -> str:
  """``" $1,000. "`` -> ``"1000"`` (the reference's 'pure string', plus ``$`` removal)."""
  return text.strip("#\n ").rstrip(".").replace(",", "").replace("$", "").strip().lower()


def _as_float(text: str) -> float | None:
  try:
    return float(text)  # NaN parses too, and then never equals anything
  except ValueError:
    return None


def _latex(text: str) -> str:
  text = text.strip()
  return text if ("$" in text or "\\boxed" in text) else f"${text}$"


def _math_equal(pred: str, gold: str) -> bool:
  from math_verify import parse, verify  # noqa: PLC0415 (sympy: only when MATH is scored)

  # math-verify's timeouts use SIGALRM, which only works in the main thread.
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  gold_parsed = parse(_latex(gold), parsing_timeout=timeout)
  pred_parsed = parse(_latex(pred), parsing_timeout=timeout)
  if not gold_parsed or not pred_parsed:
    return normalize_number_text(pred) == normalize_number_text(gold)
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def is_correct(pred: str, gold: str, kind: AnswerKind = "number") -> bool:
  """Whether an extracted prediction matches the gold answer."""
  if kind == "math":
    return _math_equal(pred, gold)
  if kind != "number":
    raise ValueError(f"unknown answer kind {kind!r}")
  p, g = normalize_number_text(pred), normalize_number_text(gold)
  pf, gf = _as_float(p), _as_float(g)
  if pf is not None and gf is not None:
    return pf == gf
  return p == g
