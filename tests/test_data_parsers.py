"""Source-format parsers: good records, exact step formats, and bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colar_jax.data import parsers
from colar_jax.data.records import DataFormatError, Record

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

NATALIA = {
  "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
  "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
}


def write(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


# ----------------------------------------------------------------------------- GSM8k
def test_gsm8k_equations_and_natural_steps():
  rec = parsers.parse_gsm8k_line(json.dumps(NATALIA), "f:1")
  assert rec.steps == ("<<48/2=24>>", "<<48+24=72>>")
  assert rec.answer == "72"
  nat = parsers.parse_gsm8k_line(json.dumps(NATALIA), "f:1", steps_mode="natural")
  assert nat.steps == ("Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips.")
  assert nat.question == rec.question and nat.answer == "72"


def test_gsm8k_answer_commas_are_removed():
  line = json.dumps({"question": "q?", "answer": "<<500*2=1000>>\n#### 1,000"})
  assert parsers.parse_gsm8k_line(line, "f:1").answer == "1000"


@pytest.mark.parametrize(
  ("obj", "message"),
  [
    ({"question": "  ", "answer": "#### 3"}, "f.jsonl:7: empty 'question'"),
    ({"question": "q", "answer": ""}, "f.jsonl:7: empty 'answer'"),
    (
      {"question": "q", "answer": "no marker 3"},
      "f.jsonl:7: answer has no '####' final-answer marker",
    ),
    ({"question": "q", "answer": "x\n####   "}, "f.jsonl:7: empty final answer after '####'"),
    ({"question": "q", "answer": "x\n#### three"}, "f.jsonl:7: non-numeric answer 'three'"),
    (
      {"question": "q", "answer": "<<1+1=2 \n#### 2"},
      "f.jsonl:7: unbalanced '<<'/'>>' calculator annotation",
    ),
    ({"answer": "#### 2"}, "f.jsonl:7: missing field 'question'"),
    ([1, 2], "f.jsonl:7: expected a JSON object, got list"),
  ],
)
def test_gsm8k_bad_records(obj, message):
  with pytest.raises(DataFormatError) as e:
    parsers.parse_gsm8k_line(json.dumps(obj), "f.jsonl:7")
  assert str(e.value) == message


def test_gsm8k_invalid_json_names_file_and_line(tmp_path):
  path = write(
    tmp_path / "train.jsonl", json.dumps(NATALIA) + "\n" + '{"question": "q", "answer": \n'
  )
  with pytest.raises(DataFormatError, match=rf"^{path}:2: invalid JSON \("):
    list(parsers.read_gsm8k_jsonl(path))


def test_skip_bad_collects_messages_and_keeps_good_records(tmp_path):
  bad = json.dumps({"question": "q", "answer": "#### many"})
  path = write(
    tmp_path / "t.jsonl", "\n".join([json.dumps(NATALIA), bad, "{oops", json.dumps(NATALIA)]) + "\n"
  )
  skipped: list[str] = []
  recs = list(parsers.read_gsm8k_jsonl(path, skip_bad=True, skipped=skipped))
  assert [r.id for r in recs] == ["t.jsonl:1", "t.jsonl:4"]
  assert skipped[0] == f"{path}:2: non-numeric answer 'many'"
  assert skipped[1].startswith(f"{path}:3: invalid JSON")


# ----------------------------------------------------------------------------- GSM8k-Aug
def test_gsm8k_aug_line():
  rec = parsers.parse_gsm8k_aug_line("How many?||<<4-2=2>> <<2/.5=4>> #### 4", "v.txt:1")
  assert rec == Record("How many?", ("<<4-2=2>>", "<<2/.5=4>>"), "4", id="v.txt:1")
  empty_chain = parsers.parse_gsm8k_aug_line("Q?|| #### 26", "v.txt:2")
  assert empty_chain.steps == () and empty_chain.answer == "26"


@pytest.mark.parametrize(
  ("line", "message"),
  [
    ("no separator #### 4", "a.txt:3: expected 'question||steps #### answer'"),
    ("  ||<<1+1=2>> #### 2", "a.txt:3: empty question"),
    ("Q?||<<1+1=2>> 2", "a.txt:3: no '####' final-answer marker"),
    ("Q?||<<1+1=2>> ####", "a.txt:3: empty final answer after '####'"),
    ("Q?||<<1+1=2>> #### two", "a.txt:3: non-numeric answer 'two'"),
    ("Q?||<<1+1=2>> so 2 #### 2", "a.txt:3: unexpected text outside <<...>> steps: 'so 2'"),
  ],
)
def test_gsm8k_aug_bad_lines(line, message):
  with pytest.raises(DataFormatError) as e:
    parsers.parse_gsm8k_aug_line(line, "a.txt:3")
  assert str(e.value) == message


@pytest.mark.skipif(
  not SHARED.is_dir(),
  reason=f"shared data not found at {SHARED} (CI lays ../shared beside the repo)",
)
def test_gsm8k_equation_chain_is_exactly_the_icot_format():
  """Equation steps joined by spaces + ' #### ans' reproduce every iCoT GSM8k-Aug test line."""
  orig = list(parsers.read_gsm8k_jsonl(SHARED / "gsm8k" / "test.jsonl"))
  lines = (SHARED / "gsm8k_aug" / "test.txt").read_text(encoding="utf-8").splitlines()
  assert len(orig) == len(lines) == 1319
  for rec, line in zip(orig, lines, strict=True):
    aug = parsers.parse_gsm8k_aug_line(line, "x")
    assert (rec.question, rec.steps, rec.answer) == (aug.question, aug.steps, aug.answer)


# ----------------------------------------------------------------------------- test-only sets
def test_fixture_formats():
  hard = list(
    parsers.read_jsonl_objects(
      FIXTURES / "gsm_hard" / "gsmhardv2.jsonl", parse=parsers.parse_gsm_hard_obj
    )
  )
  assert [r.answer for r in hard] == ["1000000", "7500003", "3.5"]
  assert hard[0].steps[0].startswith("def solution():") and len(hard[0].steps) == 1
  svamp = list(
    parsers.read_json_list(FIXTURES / "svamp" / "SVAMP.json", parse=parsers.parse_svamp_obj)
  )
  assert (
    svamp[0].question
    == "Jack had 76 marbles. He gave some marbles to his sister. If he has 25 marbles left, how many did he give away?"
  )
  assert [(r.steps, r.answer) for r in svamp] == [
    (("( 76.0 - 25.0 )",), "51"),
    (("( 8.0 * 12.0 )",), "96"),
    (("( 9.0 / 4.0 )",), "2.25"),
  ]
  assert [r.id for r in svamp] == [
    "SVAMP.json:2",
    "SVAMP.json:10",
    "SVAMP.json:18",
  ]  # line of each object
  multi = list(
    parsers.read_json_list(
      FIXTURES / "multiarith" / "MultiArith.json", parse=parsers.parse_multiarith_obj
    )
  )
  assert [(r.steps, r.answer) for r in multi] == [
    (("X=((32.0+42.0)-35.0)",), "39"),
    (("X=((6.0*7.0)-5.0)",), "37"),
  ]
  assert multi[0].question.startswith("A shop")


def test_json_list_record_errors_point_at_the_object_line(tmp_path):
  objs = [
    {"Body": "b", "Question": "q?", "Equation": "( 1.0 + 1.0 )", "Answer": 2.0},
    {"Body": "b", "Question": "q?", "Equation": "( 1.0 + 1.0 )", "Answer": "lots"},
  ]
  path = write(tmp_path / "SVAMP.json", json.dumps(objs, indent=2))
  with pytest.raises(DataFormatError) as e:
    list(parsers.read_json_list(path, parse=parsers.parse_svamp_obj))
  assert str(e.value) == f"{path}:8: non-numeric Answer 'lots'"


def test_json_list_invalid_json_is_always_fatal(tmp_path):
  path = write(tmp_path / "MultiArith.json", '[\n  {"sQuestion": "q"},\n  {"sQuestion": \n]\n')
  with pytest.raises(DataFormatError, match=rf"^{path}:4: invalid JSON"):
    list(
      parsers.read_json_list(path, parse=parsers.parse_multiarith_obj, skip_bad=True, skipped=[])
    )


@pytest.mark.parametrize(
  ("obj", "message"),
  [
    ({"input": "q", "code": "", "target": 1}, "g:1: empty 'code'"),
    ({"input": "q", "code": "x", "target": "n/a"}, "g:1: non-numeric target 'n/a'"),
    ({"input": "q", "code": "x", "target": None}, "g:1: non-numeric target None"),
    ({"input": "q", "code": "x"}, "g:1: missing field 'target'"),
  ],
)
def test_gsm_hard_bad_records(obj, message):
  with pytest.raises(DataFormatError) as e:
    parsers.parse_gsm_hard_obj(obj, "g:1")
  assert str(e.value) == message


def test_multiarith_bad_records():
  with pytest.raises(
    DataFormatError, match="^m:2: 'lEquations' must be a non-empty list of strings$"
  ):
    parsers.parse_multiarith_obj({"sQuestion": "q", "lEquations": [], "lSolutions": [1]}, "m:2")
  with pytest.raises(DataFormatError, match="^m:2: 'lSolutions' must be a non-empty list$"):
    parsers.parse_multiarith_obj({"sQuestion": "q", "lEquations": ["X=1"], "lSolutions": []}, "m:2")


# ----------------------------------------------------------------------------- MATH
@pytest.mark.parametrize(
  ("solution", "answer"),
  [
    (r"so $x = \boxed{4}$.", "4"),
    (r"first $\boxed{1}$ then $\boxed{\frac{3}{4}}$", r"\frac{3}{4}"),
    (
      r"$\boxed{\left(\frac{1}{2}\right)^{2}=\frac{1}{4}}$",
      r"\left(\frac{1}{2}\right)^{2}=\frac{1}{4}",
    ),
    (r"set $\boxed{\{1, 2, 4\}}$", r"\{1, 2, 4\}"),
    (r"escaped close $\boxed{a\}b}$", r"a\}b"),
    (r"$\boxed 5$", "5"),
    (r"$\fbox{7}$", "7"),
  ],
)
def test_last_boxed_content(solution, answer):
  assert parsers.last_boxed_content(solution) == answer


@pytest.mark.parametrize(
  ("solution", "error"),
  [
    (r"the answer is $\boxed{\frac{1}{2}$", "unbalanced \\boxed{ (braces never close)"),
    (r"$\boxed{1}$ and later $\boxed{{2}$", "unbalanced \\boxed{ (braces never close)"),
    ("no box at all", "no \\boxed{...} in solution"),
    (r"$\boxed{ }$", "empty \\boxed{} answer"),
  ],
)
def test_last_boxed_errors(solution, error):
  with pytest.raises(ValueError) as e:
    parsers.last_boxed_content(solution)
  assert str(e.value) == error


def test_math_tree_and_jsonl_fixtures():
  tree = list(parsers.read_math_tree(FIXTURES / "math_tree" / "train"))
  assert [(r.id, r.answer) for r in tree] == [
    ("train/algebra/1.json", "4"),
    ("train/algebra/2.json", r"\frac{3}{4}"),
    ("train/number_theory/7.json", r"\{1, 2, 4\}"),
  ]
  assert tree[2].extras == {"level": "Level 3", "type": "Number Theory"}
  assert tree[0].steps == ("Subtracting 3 gives $2x = 8$, so $x = \\boxed{4}$.",)
  jl = list(
    parsers.read_jsonl_objects(FIXTURES / "math_jsonl" / "test.jsonl", parse=parsers.parse_math_obj)
  )
  assert jl[0].answer == r"\left(\frac{1}{2}\right)^{2}=\frac{1}{4}"


def test_math_unbalanced_box_in_a_tree_file(tmp_path):
  good = {"problem": "p", "level": "Level 1", "type": "Algebra", "solution": r"$\boxed{1}$"}
  write(tmp_path / "train" / "algebra" / "1.json", json.dumps(good))
  bad = write(
    tmp_path / "train" / "algebra" / "2.json",
    json.dumps({**good, "solution": r"$\boxed{\frac{1}{2}$"}),
  )
  with pytest.raises(DataFormatError) as e:
    list(parsers.read_math_tree(tmp_path / "train"))
  assert str(e.value) == f"{bad}:1: unbalanced \\boxed{{ (braces never close)"
  skipped: list[str] = []
  assert len(list(parsers.read_math_tree(tmp_path / "train", skip_bad=True, skipped=skipped))) == 1
  assert skipped == [str(e.value)]


def test_math_invalid_json_file(tmp_path):
  bad = write(tmp_path / "test" / "x" / "1.json", '{\n  "problem": "p",\n  "solution": \n}')
  with pytest.raises(DataFormatError, match=rf"^{bad}:4: invalid JSON"):
    list(parsers.read_math_tree(tmp_path / "test"))
