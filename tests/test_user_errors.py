"""Every bad input of issue 16, run as a user would (``colar_jax.cli.main([...])``, in
process): a non-zero exit with ONE ``error:`` line that names the culprit (file, key,
parameter or step), and config values checked before any set-up work (the workdir is
not even created). Plus config drift on resume: safe keys listed, others refused in one
line unless ``--allow_config_change``, which records the change.

The run-based cases share one tiny trained run (tests/helpers/tiny_run.py).
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import tiny_run

from colar_jax import cli

pytestmark = pytest.mark.usefixtures("restore_logging")  # main() sets up logging


def _error(*argv: str) -> str:
  """The one-line message a user error exits with (non-zero: a str code)."""
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  msg = e.value.code
  assert isinstance(msg, str), msg  # sys.exit(str) exits with status 1
  assert msg.startswith("error: ") and "\n" not in msg, msg
  return msg


def _sft(wd: str, data_dir: str, *extra: str, **over) -> list[str]:
  return ["sft", f"--config={tiny_run.CONFIG}", f"--workdir={wd}"] + [
    *tiny_run.overrides(data_dir, **over),
    *extra,
  ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
  return tiny_run.trained_run(tmp_path_factory)


# ----------------------------------------------------------------------------
# Config values: refused before any set-up work (nothing is written)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
  "command, key, value",
  [
    ("sft", "train.ckpt_every", "0"),
    ("sft", "train.num_steps", "-3"),
    ("rl", "rl.num_steps", "-3"),
    ("sft", "data.batch_size", "0"),
  ],
)
def test_bad_value_names_the_key(tmp_path, command, key, value):
  wd = tmp_path / "w"
  argv = _sft(str(wd), str(tmp_path / "data"), **{key: value})
  argv[0] = command
  msg = _error(*argv)
  assert f"config.{key}: must be >=" in msg and value in msg, msg
  assert not wd.exists()


def test_missing_config_file_is_named(tmp_path):
  msg = _error("sft", "--config=configs/no_such.py", f"--workdir={tmp_path / 'w'}")
  assert "configs/no_such.py" in msg
  assert not (tmp_path / "w").exists()


def test_missing_hf_dir_is_named(tmp_path):
  missing = str(tmp_path / "no_model")
  msg = _error(*_sft(str(tmp_path / "w"), str(tmp_path / "d"), **{"model.hf_dir": missing}))
  assert msg == f"error: config.model.hf_dir: {missing} is not a directory"
  assert not (tmp_path / "w").exists()


def test_unknown_dataset_and_split_found_before_setup(tmp_path):
  wd, data = str(tmp_path / "w"), str(tmp_path / "d")
  msg = _error(*_sft(wd, data, **{"data.dataset": "gsm9k"}))
  assert msg.startswith("error: config.data.dataset: unknown dataset 'gsm9k'; known: ")
  assert "gsm8k" in msg
  msg = _error(*_sft(wd, data, **{"data.train_split": "trian"}))
  assert "config.data.train_split" in msg and "'trian'" in msg and "'train'" in msg
  assert not os.path.exists(wd) and not os.path.exists(data)  # nothing prepared either


def test_convert_missing_source_is_named(tmp_path):
  missing = str(tmp_path / "missing")
  msg = _error("convert", "orbax-to-hf", missing, str(tmp_path / "out"))
  assert msg == f"error: config: orbax-to-hf: {missing} does not exist"


def _gsm8k_source(root, train: str, test: str) -> str:
  root.mkdir()
  (root / "train.jsonl").write_text(train)
  (root / "test.jsonl").write_text(test)
  return str(root)


GOOD = '{"question": "1+1?", "answer": "<<1+1=2>> #### 2"}\n'


def test_malformed_data_line_in_the_trainer(tmp_path):
  src = _gsm8k_source(tmp_path / "src", GOOD + "not json\n", GOOD)
  msg = _error(
    *_sft(str(tmp_path / "w"), str(tmp_path / "d"), **{"data.dataset": "gsm8k", "data.source": src})
  )
  assert msg.startswith(f"error: {src}/train.jsonl:2: "), msg


def test_empty_source_dir_and_empty_files(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  msg = _error("data", "prepare", "gsm8k", f"--data_dir={tmp_path / 'd'}", f"--source={empty}")
  assert msg == f"error: --source: {empty} is an empty directory (no source files)"
  src = _gsm8k_source(tmp_path / "src", "", GOOD)
  msg = _error("data", "prepare", "gsm8k", f"--data_dir={tmp_path / 'd'}", f"--source={src}")
  assert msg == f"error: --source: source file {src}/train.jsonl is empty"
  # The trainer names its key.
  over = {"data.dataset": "gsm8k", "data.source": str(empty)}
  msg = _error(*_sft(str(tmp_path / "w"), str(tmp_path / "d"), **over))
  assert msg.startswith(f"error: config.data.source: {empty} is an empty directory")


def test_truncated_tokenizer_for_the_trainer(tmp_path, trained):
  tok = tmp_path / "tok"
  tok.mkdir()
  text = open(os.path.join(trained[0], "tokenizer", "tokenizer.json")).read()
  (tok / "tokenizer.json").write_text(text[: len(text) // 2])
  msg = _error(*_sft(str(tmp_path / "w"), str(tmp_path / "d"), **{"data.tokenizer": str(tok)}))
  assert msg.startswith(f"error: tokenizer {tok}/tokenizer.json is unreadable ("), msg
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------
# A trained run: generate / eval inputs
# ----------------------------------------------------------------------------
def test_generate_empty_question_and_untrained_speed(trained):
  wd, _ = trained
  assert _error("generate", f"--workdir={wd}", "  ") == "error: config: the question is empty"
  msg = _error("generate", f"--workdir={wd}", "--speed=4", "1+2")
  assert msg == (
    "error: config: --speed 4: the run was trained at thinking speeds 1, 2 only "
    "(colar.factors of its config)"
  )


def test_truncated_run_tokenizer_is_named(trained, tmp_path):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  path = os.path.join(wd, "tokenizer", "tokenizer.json")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text[:300])
  msg = _error("generate", f"--workdir={wd}", "1+2")
  assert msg.startswith(f"error: tokenizer {path} is unreadable ("), msg


def test_eval_unknown_dataset_or_split(trained, tmp_path):
  wd, _ = trained
  out = f"--out_dir={tmp_path / 'eval'}"
  msg = _error("eval", f"--workdir={wd}", "--split=tset", out)
  assert msg.startswith("error: --split: synthetic has no split 'tset'; it has ["), msg
  msg = _error("eval", f"--workdir={wd}", "--dataset=gsm9k", out)
  assert msg.startswith("error: config: --dataset: unknown dataset 'gsm9k'"), msg


# ----------------------------------------------------------------------------
# Config drift on resume
# ----------------------------------------------------------------------------
def _changes(wd: str) -> list[dict]:
  with open(os.path.join(wd, "config_changes.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_lists_safe_changes(trained, tmp_path, capsys):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  cli.main(_sft(wd, trained[1], **{"train.log_every": 1, "train.keep_last": 3}))
  err = capsys.readouterr().err
  (line,) = [ln for ln in err.splitlines() if "config changed" in ln]
  assert line == (
    "INFO config changed since the last start (safe to change): train.keep_last 2 -> 3; "
    "train.log_every 2 -> 1"
  )
  (rec,) = _changes(wd)
  assert rec["safe"] == ["train.keep_last", "train.log_every"] and rec["allowed"] == []


def test_resume_refuses_other_changes_unless_allowed(trained, tmp_path):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  before = sorted(os.listdir(wd))
  msg = _error(*_sft(wd, trained[1], **{"optim.lr": 5e-4}))
  assert msg == (
    "error: config.optim.lr changed since the run started (0.001 -> 0.0005); pass "
    "--allow_config_change to resume anyway"
  )
  assert sorted(os.listdir(wd)) == before  # refused before any set-up: nothing written
  msg = _error(*_sft(wd, trained[1], **{"optim.lr": 5e-4, "seed": 3}))
  assert msg.startswith("error: config.optim.lr, config.seed have changed since the run ")
  assert "(0.001 -> 0.0005; 0 -> 3)" in msg
  # The override resumes and records the change; config.json follows.
  cli.main(_sft(wd, trained[1], "--allow_config_change", **{"optim.lr": 5e-4}))
  (rec,) = _changes(wd)
  assert rec["allowed"] == ["optim.lr"] and rec["changes"] == {"optim.lr": [0.001, 0.0005]}
  assert rec["last_checkpoint"] == 4
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.0005


def test_resume_with_another_model_shape_names_the_parameter(trained, tmp_path):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  over = {"model.arch.intermediate_size": 48}
  msg = _error(*_sft(wd, trained[1], **over))
  assert msg.startswith("error: config.model.arch.intermediate_size changed since the run ")
  msg = _error(*_sft(wd, trained[1], "--allow_config_change", **over))
  assert msg == (
    "error: config: parameter lm/layers/mlp/down_proj/kernel has shape (1, 64, 32) in "
    f"{wd}/checkpoints/4, the config gives (1, 48, 32) (the model shape changed since the "
    "run started)"
  )
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]  # not moved
  assert not os.path.exists(os.path.join(wd, "config_changes.jsonl"))  # it never resumed
