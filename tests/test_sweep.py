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


def test_commands_have_distinct_workdirs(sweep, tmp_path):
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(h):\n  return h.product([h.sweep('config.optim.lr', [0.1, 0.2]),"
               " h.fixed('config.seed', 3)])\n")
  cmds = sweep.commands(sweep.load_sweep(str(f)), "python -m x --config=c.py:tiny", "R")
  wds = [wd for wd, _ in cmds]
  assert len(set(wds)) == 2
  assert "--config.optim.lr=0.2" in cmds[1][1] and f"--workdir={wds[1]}" in cmds[1][1]


def test_collect_reads_eval_jsons(sweep, tmp_path, capsys):
  for run, acc in (("000_a", 0.5), ("001_b", 0.75)):
    d = tmp_path / run / "eval"
    d.mkdir(parents=True)
    (d / "synthetic_test.json").write_text(json.dumps(
        {"factors": {"2": {"accuracy": acc, "mean_latent_steps": 4.0}}}))
  rows = sweep.collect(str(tmp_path))
  assert [r["accuracy"] for r in rows] == [0.5, 0.75]
  sweep.print_table(rows)
  assert "001_b" in capsys.readouterr().out
