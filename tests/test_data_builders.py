"""TFDS builders (array_record, no TF) on the shipped data and on fixtures; the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from colar_jax import cli, config
from colar_jax.data import builders
from colar_jax.data.records import DataFormatError, Record
from colar_jax.data.synthetic import SyntheticTask, generate_splits

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
  not SHARED.is_dir(),
  reason=f"shared data not found at {SHARED} (CI lays ../shared beside the repo)",
)


def records(name: str, data_dir: Path, split: str, config=None) -> list[Record]:
  src = builders.load_source(name, data_dir, split, config=config)
  return [Record.from_example(src[i]) for i in range(len(src))]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"shared data not found at {SHARED}")
  data_dir = tmp_path_factory.mktemp("tfds")
  builders.prepare("gsm8k", data_dir, source=SHARED / "gsm8k")
  builders.prepare("gsm8k", data_dir, source=SHARED / "gsm8k", config="natural")
  builders.prepare("gsm8k_aug", data_dir, source=SHARED / "gsm8k_aug")
  return data_dir


@needs_shared
def test_gsm8k_counts_and_empty_chain_policy(shared_dir):
  raw = (SHARED / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
  with_chain = sum(1 for line in raw if re.search(r"<<[^<>]*>>", json.loads(line)["answer"]))
  # The brief's "7473 with non-empty chains" is not so: 95 train problems have none.
  assert (len(raw), with_chain) == (7473, 7378)
  result = builders.prepare("gsm8k", shared_dir, source=SHARED / "gsm8k")  # reused, not rebuilt
  assert result.sizes == {"train": 6878, "val": 500, "test": 1319}
  assert result.metadata["dropped_empty_chain"] == 95
  assert result.skipped == {"train.jsonl": 0, "test.jsonl": 0}
  train, val, test = (records("gsm8k", shared_dir, s) for s in ("train", "val", "test"))
  assert all(r.steps for r in train + val)
  assert sum(1 for r in test if not r.steps) == 18
  assert not {r.id for r in train} & {r.id for r in val}
  assert all(re.fullmatch(r"<<[^<>]*=[^<>]*>>", s) for r in val for s in r.steps)


@needs_shared
def test_gsm8k_natural_config_has_the_same_split_questions(shared_dir):
  eq_val = {r.id: r for r in records("gsm8k", shared_dir, "val")}
  nat_val = {r.id: r for r in records("gsm8k", shared_dir, "val", config="natural")}
  assert eq_val.keys() == nat_val.keys()
  some = next(iter(nat_val))
  assert nat_val[some].answer == eq_val[some].answer
  assert not any("<<" in s for s in nat_val[some].steps) and nat_val[some].steps


@needs_shared
def test_gsm8k_aug_splits_follow_the_files(shared_dir):
  result = builders.prepare("gsm8k_aug", shared_dir, source=SHARED / "gsm8k_aug")
  assert result.sizes == {"valid": 500, "test": 1319}
  by_id = {r.id: r for r in records("gsm8k_aug", shared_dir, "valid")}
  first = by_id["valid.txt:1"]
  assert (
    first.steps == ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>")
    and first.answer == "300"
  )


def test_prepare_is_idempotent(tmp_path):
  builders.prepare("svamp", tmp_path, source=FIXTURES / "svamp")
  files = sorted((tmp_path / "svamp").rglob("*.array_record*"))
  stamps = [f.stat().st_mtime_ns for f in files]
  again = builders.prepare("svamp", tmp_path, source=FIXTURES / "svamp")
  assert again.sizes == {"test": 3}
  assert [f.stat().st_mtime_ns for f in files] == stamps and files


@pytest.mark.parametrize(
  ("name", "source", "expected"),
  [
    ("gsm_hard", "gsm_hard", {"test": ["1000000", "7500003", "3.5"]}),
    ("svamp", "svamp/SVAMP.json", {"test": ["51", "96", "2.25"]}),
    ("multiarith", "multiarith", {"test": ["39", "37"]}),
    ("math", "math_tree", {"train": ["4", r"\frac{3}{4}", r"\{1, 2, 4\}"], "test": ["2"]}),
    (
      "math",
      "math_jsonl",
      {"train": ["6", "3"], "test": [r"\left(\frac{1}{2}\right)^{2}=\frac{1}{4}"]},
    ),
  ],
)
def test_fixture_builders(tmp_path, name, source, expected):
  result = builders.prepare(name, tmp_path, source=FIXTURES / source)
  assert result.sizes == {k: len(v) for k, v in expected.items()}
  for split, answers in expected.items():
    recs = sorted(records(name, tmp_path, split), key=lambda r: r.id)
    assert sorted(r.answer for r in recs) == sorted(answers)
    assert all(len(r.steps) == 1 and r.question for r in recs)
    if name == "math":
      assert all(r.extras["level"].startswith("Level ") and r.extras["type"] for r in recs)


def _bad_gsm8k(tmp_path: Path) -> Path:
  src = tmp_path / "src"
  src.mkdir()
  good = {"question": "Q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}
  lines = [json.dumps(good), json.dumps({"question": "", "answer": "#### 3"})] + [
    json.dumps(good)
  ] * 3
  (src / "train.jsonl").write_text("\n".join(lines) + "\n")
  (src / "test.jsonl").write_text(json.dumps(good) + "\n")
  return src


def test_bad_record_stops_preparation_or_is_skipped_and_recorded(tmp_path):
  src = _bad_gsm8k(tmp_path)
  with pytest.raises(DataFormatError) as e:
    builders.prepare(
      "gsm8k", tmp_path / "d1", source=src, config=builders.Gsm8kConfig(name="tiny", val_size=1)
    )
  assert str(e.value) == f"{src / 'train.jsonl'}:2: empty 'question'"
  cfg = builders.Gsm8kConfig(name="tiny", val_size=1)
  result = builders.prepare("gsm8k", tmp_path / "d2", source=src, config=cfg, skip_bad=True)
  assert result.sizes == {"train": 3, "val": 1, "test": 1}
  assert result.skipped == {"train.jsonl": 1, "test.jsonl": 0}
  reloaded = builders.get_builder("gsm8k", tmp_path / "d2", config=cfg)  # read back from disk
  assert reloaded.info.metadata["skipped"] == {"train.jsonl": 1, "test.jsonl": 0}
  assert reloaded.info.metadata["skipped_examples"] == [
    f"{src / 'train.jsonl'}:2: empty 'question'"
  ]


def cli_main(argv: list[str]) -> int:
  """``python -m colar_jax data ...``; a user error is the SystemExit's one-line message."""
  return cli.main(["data", *argv])


def cli_error(argv: list[str]) -> str:
  with pytest.raises(SystemExit) as e:
    cli_main(argv)
  msg = e.value.code
  assert isinstance(msg, str) and "\n" not in msg and msg.startswith("error: "), msg
  return msg.removeprefix("error: ")


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_cli_prepare_bad_input_skip_bad_and_show(tmp_path, capsys):
  src = tmp_path / "svamp"
  src.mkdir()
  objs = [{"Body": "b", "Question": "q?", "Equation": "( 1.0 + 1.0 )", "Answer": 2.0}] * 2
  objs.insert(1, {"Body": "b", "Question": "q?", "Equation": "", "Answer": 3.0})
  (src / "SVAMP.json").write_text(json.dumps(objs, indent=1))
  data_dir = str(tmp_path / "data")
  assert (
    cli_error(["prepare", "svamp", "--source", str(src), "--data_dir", data_dir])
    == f"{src / 'SVAMP.json'}:8: empty 'Equation'"
  )
  capsys.readouterr()
  assert (
    cli_main(["prepare", "svamp", "--source", str(src), "--data_dir", data_dir, "--skip_bad"]) == 0
  )
  out = capsys.readouterr().out
  assert "test: 2\n" in out and "dropped: 1 of 3 records: 1 empty 'Equation'\n" in out
  assert cli_main(["show", "svamp", "--data_dir", data_dir, "-n", "1", "--split", "test"]) == 0
  out = capsys.readouterr().out
  assert "question: b q?" in out and "step 1: ( 1.0 + 1.0 )" in out and "answer: 2" in out
  assert "no split 'nope'" in cli_error(
    ["show", "svamp", "--data_dir", data_dir, "--split", "nope"]
  )


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_cli_synthetic_options(tmp_path, capsys):
  args = [
    "--data_dir",
    str(tmp_path),
    "--config.data.synthetic.train_size=50",
    "--config.data.synthetic.val_size=5",
    "--config.data.synthetic.test_size",
    "5",
  ]
  assert cli_main(["prepare", "synthetic", *args]) == 0
  assert capsys.readouterr().out.splitlines() == [
    "test: 5",
    "train: 50",
    "val: 5",
    "dropped: 0 records",
  ]
  assert cli_main(["show", "synthetic", *args, "-n", "1"]) == 0
  assert re.search(r"question: x=\d;x[-+*]\d;", capsys.readouterr().out)
  # The options are the dataset's identity: other options are another, unprepared dataset.
  assert "not prepared" in cli_error(["show", "synthetic", *args, "--config.data.synthetic.seed=7"])
  assert "needs --source" in cli_error(["prepare", "gsm8k", "--data_dir", str(tmp_path)])
  assert "BuilderConfig nope not found" in cli_error(
    ["show", "gsm8k", "--data_dir", str(tmp_path), "--builder_config", "nope"]
  )
  assert cli_error(
    ["prepare", "synthetic", *args, "--config.data.synthetic.max_step=6"]
  ).startswith("config.data.synthetic.max_step: no such key; did you mean data.synthetic.max_steps")
  assert "data.synthetic.min_steps" in cli_error(
    ["prepare", "synthetic", *args, "--config.data.synthetic.min_steps=9"]
  )
  assert "distinct ones exist" in cli_error(
    [
      "prepare",
      "synthetic",
      *args,
      "--config.data.synthetic.max_steps=1",
      "--config.data.synthetic.min_steps=1",
      "--config.data.synthetic.train_size=1000",
    ]
  )
  assert "not --builder_config" in cli_error(
    ["prepare", "synthetic", *args, "--builder_config", "natural"]
  )
  assert "unknown dataset 'nope'" in cli_error(["prepare", "nope", "--data_dir", str(tmp_path)])


def test_the_run_config_section_is_the_synthetic_task():
  fields = [f.name for f in dataclasses.fields(SyntheticTask)]
  assert [f.name for f in dataclasses.fields(config.Synthetic)] == fields
  section = dataclasses.replace(
    config.Synthetic(),
    min_steps=2,
    max_steps=6,
    operators="+-",
    seed=9,
    step_style="short",
    max_noop_steps=2,
    noop_percent=50,
    train_size=300,
  )
  task = builders.synthetic_task(section)
  assert task == SyntheticTask(
    min_steps=2,
    max_steps=6,
    operators="+-",
    seed=9,
    step_style="short",
    max_noop_steps=2,
    noop_percent=50,
    train_size=300,
  )
  run = config.from_config_dict(
    config.apply_overrides(
      config.base_config(), ["data.synthetic.max_steps=6", "data.synthetic.seed=9"]
    )
  )
  assert (
    builders.builder_config(run.data).name
    == builders.synthetic_config(builders.synthetic_task(run.data.synthetic)).name
  )
  assert builders.builder_config(dataclasses.replace(run.data, dataset="gsm8k")) is None


def test_synthetic_builder_matches_the_generator(tmp_path):
  task = SyntheticTask(train_size=200, val_size=20, test_size=30, seed=5)
  cfg = builders.synthetic_config(task)
  assert builders.prepare("synthetic", tmp_path, config=cfg).sizes == {
    "train": 200,
    "val": 20,
    "test": 30,
  }
  expected = generate_splits(task)
  for split in ("train", "val", "test"):
    got = sorted(records("synthetic", tmp_path, split, config=cfg), key=lambda r: r.id)
    assert got == sorted(expected[split], key=lambda r: r.id)
