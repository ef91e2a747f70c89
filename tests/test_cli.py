"""The one command line, in process: ``colar_jax.cli.main([...])``.

User errors exit with ``SystemExit("error: ...")``: one line that names the key."""

import pytest

from colar_jax import cli

ALL_COMMANDS = {"sft", "rl", "eval", "generate", "convert", "data", "demo", "config"}
pytestmark = pytest.mark.usefixtures("restore_logging")  # main() sets up logging


def _help(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main([*argv, "--help"])
  assert e.value.code in (0, None)
  return capsys.readouterr().out


def _error(*argv) -> str:
  """The one-line message a user error exits with."""
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  msg = e.value.code
  assert isinstance(msg, str), msg
  assert msg.startswith("error: ") and "\n" not in msg, msg
  return msg


def test_eval_help_lists_config(capsys):
  out = _help(capsys, "eval")
  assert "--config FILE[:ARG]" in out and "--workdir" in out and "--compression" in out
  assert "--config.SECTION.KEY=VALUE" in out


def test_every_command_takes_config(capsys):
  assert set(cli.COMMANDS) == ALL_COMMANDS
  for name in cli.COMMANDS:
    assert "--config FILE[:ARG]" in _help(capsys, name), name
  # ... and the top-level help lists every command.
  top = _help(capsys)
  assert all(name in top for name in ALL_COMMANDS)


def test_config_show_marks_overrides(capsys):
  cli.main(["config", "show", "configs/base.py:tiny", "--config.optim.lr=0.5"])
  lines = capsys.readouterr().out.splitlines()
  (lr,) = [ln for ln in lines if ln[2:].startswith("optim.lr =")]
  assert lr.startswith("* ") and "optim.lr = 0.5 " in lr and "(default: 0.0001)" in lr
  (rl_lr,) = [ln for ln in lines if ln[2:].startswith("rl.optim.lr =")]
  assert rl_lr.startswith("  ")  # unchanged keys are not marked
  # --config=FILE:ARG is the same as the positional spec; "--config.k v" the same as "=".
  cli.main(["config", "show", "--config=configs/base.py:tiny", "--config.optim.lr", "0.5"])
  assert capsys.readouterr().out.splitlines() == lines


def test_misspelt_key_names_the_nearest():
  msg = _error("config", "show", "configs/base.py:tiny", "--config.optim.lrr=0.5")
  assert "config.optim.lrr" in msg and "did you mean optim.lr?" in msg


def test_misspelt_section_names_the_nearest():
  msg = _error("config", "show", "configs/base.py:tiny", "--config.optimm.lr=0.5")
  assert "config.optimm.lr" in msg and "optim.lr" in msg


def test_missing_config_file_is_named(tmp_path):
  msg = _error("config", "show", "--config=missing.py")
  assert "missing.py" in msg
  msg = _error("sft", "--config=missing.py", f"--workdir={tmp_path / 'w'}")
  assert "missing.py" in msg


def test_sft_unknown_method_fails_naming_the_key(tmp_path):
  # jax_cache_dir='' keeps the test process's compilation cache settings untouched.
  msg = _error(
    "sft",
    "--config=configs/base.py:tiny",
    "--config.method=cocon",
    "--config.jax_cache_dir=",
    f"--workdir={tmp_path / 'w'}",
  )
  assert "config.method" in msg and "cocon" in msg


def test_bad_values_fail_in_one_line(tmp_path):
  assert "config.optim.lr" in _error("config", "show", "--config.optim.lr=abc")
  assert "--compression" in _error("eval", "--workdir=/nonexistent", "--compression=a")
  assert "--seeds" in _error("eval", "--workdir=/nonexistent", "--seeds=0")
  assert "/nonexistent" in _error("eval", "--workdir=/nonexistent")  # no checkpoint
  assert "question" in _error("generate", f"--workdir={tmp_path}")


def test_unrecognized_argument_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["config", "show", "--no_such_flag"])
  assert e.value.code == 2 and "--no_such_flag" in capsys.readouterr().err
