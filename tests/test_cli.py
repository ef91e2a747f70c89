"""The one command line, in process: ``colar_jax.cli.main([...])``.

User errors exit with ``SystemExit("error: ...")``: one line that names the key."""

import jax
import pytest

from colar_jax import cli
from colar_jax.train import state as train_state

ALL_COMMANDS = {"sft", "rl", "eval", "generate", "convert", "export", "data", "demo", "config"}
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


def _oom(*args, **kwargs):
  raise jax.errors.JaxRuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 35.2GiB."
  )


def test_out_of_memory_names_remat_and_the_batch_size(tmp_path, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED from the jitted step -> one line naming what to change."""
  monkeypatch.setattr(train_state, "compile_steps", lambda *a, **k: (_oom, _oom))
  tiny = {
    "data.data_dir": tmp_path / "data",
    "data.synthetic.train_size": 32,
    "data.synthetic.val_size": 8,
    "data.synthetic.test_size": 8,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "train.num_steps": 2,
    "train.progress": False,
    "model.arch.num_layers": 1,
    "jax_cache_dir": "",
  }
  argv = ["sft", "--config=configs/base.py:tiny,cot", f"--workdir={tmp_path / 'w'}"]
  msg = _error(*argv, *(f"--config.{k}={v}" for k, v in tiny.items()))
  assert "RESOURCE_EXHAUSTED" in msg and "--config.model.remat=true" in msg
  assert "--config.data.batch_size (now 8)" in msg
  monkeypatch.setattr(cli.rl_loop, "train", _oom)
  msg = _error("rl", "--config.model.remat=true", "--config.jax_cache_dir=", "--workdir=/w")
  assert "model.remat is already on" in msg and "--config.rl.exp_batch_size (now 8)" in msg

  def other(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(cli.rl_loop, "train", other)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # not a memory error
    cli.main(["rl", "--config.jax_cache_dir=", "--workdir=/w"])
