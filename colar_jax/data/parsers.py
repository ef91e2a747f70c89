"""Plain-Python parsers for every source format (no tfds, no jax: testable on their own).

Each ``parse_*`` function turns ONE raw line/object into a :class:`Record` or raises
:class:`DataFormatError` with a ``"file:line: what is wrong"`` message. The ``read_*``
functions walk a whole file, and either stop at the first bad record (default) or, with
``skip_bad=True``, append each message to ``skipped`` and go on. A file that is not valid
JSON as a whole (SVAMP / MultiArith lists) can not be partially skipped and always stops.

Step formats (kept identical to what the reference CoLaR / iCoT / Coconut data use):
  * GSM8k "equations": each calculator annotation in order, brackets kept: ``<<48/2=24>>``.
    Joined by spaces and followed by `` #### 72`` this is byte-for-byte the iCoT
    GSM8k-Aug line (checked against the shipped ``gsm8k_aug/test.txt``).
  * GSM8k "natural": the solution lines with the ``<<...>>`` annotations removed.
  * GSM-Hard: the ``code`` program; SVAMP: ``Equation``; MultiArith: ``lEquations``
    (joined by ``"; "`` if several); MATH: the whole solution. Always a single step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from etils.epath import Path  # keeps gs:// sources (pathlib would not)

from colar_jax.data.records import DataFormatError, Record

_EQUATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


# --------------------------------------------------------------------------- helpers
def normalize_number(text: str, where: str, what: str = "answer") -> str:
  """``" 1,000 "`` -> ``"1000"``; raise unless the text is a plain decimal number."""
  s = text.strip().replace(",", "")
  if not _NUMBER.fullmatch(s):
    raise DataFormatError(f"{where}: non-numeric {what} {text.strip()!r}")
  return s


def format_number(value: Any, where: str, what: str = "answer") -> str:
  """A JSON number (or numeric string) as answer text: ``5.0`` -> ``"5"``, ``0.5`` -> ``"0.5"``."""
  if isinstance(value, bool) or value is None:
    raise DataFormatError(f"{where}: non-numeric {what} {value!r}")
  if isinstance(value, str):
    return normalize_number(value, where, what)
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    raise DataFormatError(f"{where}: non-numeric {what} {value!r}")
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return repr(value)


def _require_text(obj: dict[str, Any], key: str, where: str) -> str:
  if key not in obj:
    raise DataFormatError(f"{where}: missing field {key!r}")
  value = obj[key]
  if not isinstance(value, str):
    raise DataFormatError(f"{where}: field {key!r} is not a string")
  if not value.strip():
    raise DataFormatError(f"{where}: empty {key!r}")
  return value.strip()


def _load_json_object(line: str, where: str) -> dict[str, Any]:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  return obj


# --------------------------------------------------------------------------- GSM8k
def split_gsm8k_solution(solution: str, where: str) -> tuple[str, str]:
  """``"...\\n#### 72"`` -> (reasoning text, normalised answer)."""
  if "####" not in solution:
    raise DataFormatError(f"{where}: answer has no '####' final-answer marker")
  body, _, final = solution.rpartition("####")
  if not final.strip():
    raise DataFormatError(f"{where}: empty final answer after '####'")
  return body, normalize_number(final, where)


def gsm8k_equations(body: str, where: str) -> list[str]:
  """The ``<<...>>`` calculator annotations in order, brackets kept."""
  if body.count("<<") != body.count(">>"):
    raise DataFormatError(f"{where}: unbalanced '<<'/'>>' calculator annotation")
  return [f"<<{m.strip()}>>" for m in _EQUATION.findall(body)]


def gsm8k_natural_lines(body: str) -> list[str]:
  """Solution lines with calculator annotations removed (GSM8k-Aug-NL style)."""
  lines = (_EQUATION.sub("", line).strip() for line in body.splitlines())
  return [" ".join(line.split()) for line in lines if line]


def parse_gsm8k_line(line: str, where: str, *, steps_mode: str = "equations") -> Record:
  """One line of the original GSM8k jsonl (``{"question", "answer"}``)."""
  obj = _load_json_object(line, where)
  question = _require_text(obj, "question", where)
  solution = _require_text(obj, "answer", where)
  body, answer = split_gsm8k_solution(solution, where)
  steps = gsm8k_equations(body, where)  # validated in both modes: same records either way
  if steps_mode == "natural":
    steps = gsm8k_natural_lines(body)
  elif steps_mode != "equations":
    raise ValueError(f"unknown GSM8k steps_mode {steps_mode!r}")
  return Record(question, tuple(steps), answer, id=where)


def parse_gsm8k_aug_line(line: str, where: str) -> Record:
  """One iCoT line: ``question||<<48/2=24>> <<48+24=72>> #### 72``."""
  if "||" not in line:
    raise DataFormatError(f"{where}: expected 'question||steps #### answer'")
  question, _, rest = line.partition("||")
  if not question.strip():
    raise DataFormatError(f"{where}: empty question")
  if "####" not in rest:
    raise DataFormatError(f"{where}: no '####' final-answer marker")
  chain, _, final = rest.rpartition("####")
  if not final.strip():
    raise DataFormatError(f"{where}: empty final answer after '####'")
  answer = normalize_number(final, where)
  leftover = _EQUATION.sub("", chain).strip()
  if leftover:
    raise DataFormatError(f"{where}: unexpected text outside <<...>> steps: {leftover[:40]!r}")
  steps = tuple(f"<<{m.strip()}>>" for m in _EQUATION.findall(chain))
  return Record(question.strip(), steps, answer, id=where)


# --------------------------------------------------------------------------- test-only sets
def parse_gsm_hard_obj(obj: Any, where: str) -> Record:
  """PAL GSM-Hard: ``{"input", "code", "target"}``; the program is the single step."""
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  question = _require_text(obj, "input", where)
  code = _require_text(obj, "code", where)
  if "target" not in obj:
    raise DataFormatError(f"{where}: missing field 'target'")
  return Record(question, (code,), format_number(obj["target"], where, "target"), id=where)


def parse_svamp_obj(obj: Any, where: str) -> Record:
  """SVAMP: ``{"Body", "Question", "Equation", "Answer"}``; the equation is the single step."""
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  body = obj.get("Body", "")
  if not isinstance(body, str):
    raise DataFormatError(f"{where}: field 'Body' is not a string")
  question = " ".join(p for p in (body.strip(), _require_text(obj, "Question", where)) if p)
  equation = _require_text(obj, "Equation", where)
  if "Answer" not in obj:
    raise DataFormatError(f"{where}: missing field 'Answer'")
  return Record(question, (equation,), format_number(obj["Answer"], where, "Answer"), id=where)


def parse_multiarith_obj(obj: Any, where: str) -> Record:
  """MultiArith: ``{"sQuestion", "lEquations", "lSolutions"}``."""
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  question = _require_text(obj, "sQuestion", where)
  eqs, sols = obj.get("lEquations"), obj.get("lSolutions")
  if not isinstance(eqs, list) or not eqs or not all(isinstance(e, str) and e.strip() for e in eqs):
    raise DataFormatError(f"{where}: 'lEquations' must be a non-empty list of strings")
  if not isinstance(sols, list) or not sols:
    raise DataFormatError(f"{where}: 'lSolutions' must be a non-empty list")
  step = "; ".join(e.strip() for e in eqs)
  return Record(question, (step,), format_number(sols[0], where, "solution"), id=where)


# --------------------------------------------------------------------------- MATH
def last_boxed_content(text: str) -> str:
  r"""Content of the LAST ``\boxed{...}`` (or ``\fbox{...}``), nested braces balanced.

  Escaped braces (``\{``, ``\}``) are literal characters, not structure. ``\boxed 5``
  (no braces) yields ``"5"``. Raises ``ValueError`` when there is no box or its braces
  never close, so callers can report the exact location.
  """
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    raise ValueError("no \\boxed{...} in solution")
  i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
  if i < len(text) and text[i] == " ":
    m = re.match(r" +([^\s$]+)", text[i:])
    if m is None:
      raise ValueError("empty \\boxed answer")
    return m.group(1)
  if i >= len(text) or text[i] != "{":
    raise ValueError("\\boxed not followed by '{'")
  depth, j = 0, i
  while j < len(text):
    c = text[j]
    if c == "\\":
      j += 2  # an escaped character (``\{``, ``\}``, ``\\``) is never structural
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        content = text[i + 1 : j].strip()
        if not content:
          raise ValueError("empty \\boxed{} answer")
        return content
    j += 1
  raise ValueError("unbalanced \\boxed{ (braces never close)")


def parse_math_obj(obj: Any, where: str) -> Record:
  """Hendrycks MATH: ``{"problem", "level", "type", "solution"}``."""
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  problem = _require_text(obj, "problem", where)
  solution = _require_text(obj, "solution", where)
  try:
    answer = last_boxed_content(solution)
  except ValueError as e:
    raise DataFormatError(f"{where}: {e}") from None
  extras = {k: str(obj.get(k, "") or "") for k in ("level", "type")}
  return Record(problem, (solution,), answer, id=where, extras=extras)


# --------------------------------------------------------------------------- file readers
def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
  """Yield (line number, element) for a JSON list file, so record errors get a line."""
  text = path.read_text(encoding="utf-8")
  decoder = json.JSONDecoder()

  def fail(msg: str, pos: int) -> DataFormatError:
    return DataFormatError(f"{path}:{text.count(chr(10), 0, pos) + 1}: {msg}")

  def skip_ws(pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  pos = skip_ws(0)
  if pos >= len(text) or text[pos] != "[":
    raise fail("invalid JSON (expected a JSON list of records)", pos)
  pos = skip_ws(pos + 1)
  if pos < len(text) and text[pos] == "]":
    return
  while True:
    try:
      obj, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    yield text.count("\n", 0, pos) + 1, obj
    pos = skip_ws(end)
    if pos < len(text) and text[pos] == ",":
      pos = skip_ws(pos + 1)
    elif pos < len(text) and text[pos] == "]":
      return
    else:
      raise fail("invalid JSON (expected ',' or ']' after a list element)", pos)


def _guard(
  items: Iterator[tuple[str, Callable[[], Record]]], skip_bad: bool, skipped: list[str] | None
) -> Iterator[Record]:
  """Run each (record id, thunk); stop at, or with ``skip_bad`` collect, format errors.

  The id is the source file NAME and line, so prepared data does not depend on where
  the source folder was; error messages keep the full path for the user.
  """
  for rid, make in items:
    try:
      rec = make()
    except DataFormatError as e:
      if not skip_bad:
        raise
      if skipped is not None:
        skipped.append(str(e))
      continue
    yield dataclasses.replace(rec, id=rid)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\n").rstrip("\r")
      if line.strip():
        yield lineno, line


def read_gsm8k_jsonl(
  path: Path,
  *,
  steps_mode: str = "equations",
  skip_bad: bool = False,
  skipped: list[str] | None = None,
) -> Iterator[Record]:
  items = (
    (f"{path.name}:{n}", lambda l=l, w=f"{path}:{n}": parse_gsm8k_line(l, w, steps_mode=steps_mode))
    for n, l in _lines(path)
  )
  return _guard(items, skip_bad, skipped)


def read_gsm8k_aug_txt(
  path: Path, *, skip_bad: bool = False, skipped: list[str] | None = None
) -> Iterator[Record]:
  items = (
    (f"{path.name}:{n}", lambda l=l, w=f"{path}:{n}": parse_gsm8k_aug_line(l, w))
    for n, l in _lines(path)
  )
  return _guard(items, skip_bad, skipped)


def read_jsonl_objects(
  path: Path,
  parse: Callable[[Any, str], Record],
  *,
  skip_bad: bool = False,
  skipped: list[str] | None = None,
) -> Iterator[Record]:
  """Any one-object-a-line file (GSM-Hard, MATH jsonl)."""
  items = (
    (f"{path.name}:{n}", lambda l=l, w=f"{path}:{n}": parse(_load_json_object(l, w), w))
    for n, l in _lines(path)
  )
  return _guard(items, skip_bad, skipped)


def read_json_list(
  path: Path,
  parse: Callable[[Any, str], Record],
  *,
  skip_bad: bool = False,
  skipped: list[str] | None = None,
) -> Iterator[Record]:
  """A JSON list file (SVAMP, MultiArith). Invalid JSON always stops."""
  items = (
    (f"{path.name}:{n}", lambda o=o, w=f"{path}:{n}": parse(o, w)) for n, o in iter_json_array(path)
  )
  return _guard(items, skip_bad, skipped)


def read_math_tree(
  split_dir: Path, *, skip_bad: bool = False, skipped: list[str] | None = None
) -> Iterator[Record]:
  """``<split>/<subject>/<id>.json``, one problem a file, in sorted path order."""

  def load(path: Path) -> Record:
    text = path.read_text(encoding="utf-8")
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return parse_math_obj(obj, f"{path}:1")

  items = (
    (p.relative_to(split_dir.parent).as_posix(), lambda p=p: load(p))
    # (epath's glob refuses ``**`` on object stores: a walk lists each dir once)
    for p in sorted(
      Path(d) / f for d, _, fs in Path(split_dir).walk() for f in fs if f.endswith(".json")
    )
  )
  return _guard(items, skip_bad, skipped)
