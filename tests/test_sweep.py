"""launch/sweep.py: expansion, per-run workdirs, result collection."""

import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def sweep(repo_root):
  spec = importlib.util.spec_from_file_location("sweep", repo_root / "launch" / "sweep.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_product_and_zip(sweep):
  h = sweep.Hyper()
  runs = h.product([h.sweep("config.a", [1, 2]), h.sweep("config.b", ["x", "y", "z"])])
  assert len(runs) == 6 and {"config.a": 2, "config.b": "z"} in runs
  z = h.zip([h.sweep("config.a", [1, 2]), h.sweep("config.b", ["x", "y"])])
  assert z == [{"config.a": 1, "config.b": "x"}, {"config.a": 2, "config.b": "y"}]
  with pytest.raises(ValueError, match="different lengths"):
    h.zip([h.sweep("config.a", [1]), h.sweep("config.b", [1, 2])])


BASE_CMD = "python -m colar_jax sft --config=configs/base.py:tiny,colar"


def test_commands_have_distinct_workdirs(sweep, tmp_path):
  f = tmp_path / "s.py"
  f.write_text(
    "def get_sweep(h):\n  return h.product([h.sweep('config.optim.lr', [0.1, 0.2]),"
    " h.fixed('config.seed', 3)])\n"
  )
  cmds = sweep.commands(sweep.load_sweep(str(f)), BASE_CMD, "R")
  wds = [wd for wd, _ in cmds]
  assert len(set(wds)) == 2
  assert "--config.optim.lr=0.2" in cmds[1][1] and f"--workdir={wds[1]}" in cmds[1][1]
  assert cmds[1][1][:5] == [
    "python",
    "-m",
    "colar_jax",
    "sft",
    "--config=configs/base.py:tiny,colar",
  ]


def test_commands_are_accepted_by_the_cli(sweep, tmp_path):
  """Every generated command parses with ``python -m colar_jax``'s own parser, and its
  overrides (the docstring's example sweep) resolve to the intended typed values."""
  from colar_jax import cli

  f = tmp_path / "s.py"
  f.write_text(
    "def get_sweep(h):\n  return h.product([\n"
    "      h.sweep('config.colar.factors', ['1,2', '1,2,3,4,5']),\n"
    "      h.sweep('config.optim.lr', [1e-4, 3e-4])])\n"
  )
  cmds = sweep.commands(sweep.load_sweep(str(f)), BASE_CMD, str(tmp_path / "R"))
  assert len(cmds) == 4
  seen = set()
  for wd, argv in cmds:
    assert argv[:3] == ["python", "-m", "colar_jax"]
    args, rest = cli.parser().parse_known_args(argv[3:])
    overrides, unknown = cli._split_overrides(rest)
    assert (args.command, args.workdir, unknown) == ("sft", wd, [])
    run = cli.resolve_config(args.config, overrides)
    assert run.method == "colar"
    seen.add((run.colar.factors, run.optim.lr))
  assert seen == {(f, lr) for f in ((1, 2), (1, 2, 3, 4, 5)) for lr in (1e-4, 3e-4)}


def test_print_mode(sweep, tmp_path, capsys):
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(h):\n  return h.sweep('config.seed', [1, 2])\n")
  assert sweep.main(["print", str(f), "--cmd", BASE_CMD, "--root", "R"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all(ln.startswith(BASE_CMD + " --workdir=R/") for ln in lines)
  assert lines[1].endswith("--config.seed=2")


def test_collect_reads_eval_jsons(sweep, tmp_path, capsys):
  for run, acc in (("000_a", 0.5), ("001_b", 0.75)):
    d = tmp_path / run / "eval"
    d.mkdir(parents=True)
    (d / "synthetic_test.json").write_text(
      json.dumps(
        {
          "method": "colar",
          "num_questions": 4,
          "seeds": [0],
          "factors": {"2": {"accuracy": acc, "num_latent": 4.0, "accuracy_per_seed": [acc]}},
        }
      )
    )
  rows = sweep.collect(str(tmp_path))
  assert [r["accuracy"] for r in rows] == [0.5, 0.75]
  assert rows[0] == {
    "run": "000_a",
    "eval": "synthetic_test",
    "c": "2",
    "accuracy": 0.5,
    "num_latent": 4.0,
  }
  sweep.print_table(rows)
  assert "001_b" in capsys.readouterr().out
