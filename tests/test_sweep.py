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
  out = capsys.readouterr().out
  assert "001_b" in out and "75.0%" in out and "0.75" not in out


# A stand-in trainer / evaluator: writes what the real ones write into --workdir
# (metrics.jsonl train and val lines; eval/<name>.json), fails for --config.seed=13.
FAKE = """
import json, os, sys
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[2:] if "=" in a)
wd = args["workdir"]
os.makedirs(wd, exist_ok=True)
if args.get("config.seed") == "13":
  sys.exit(3)
if sys.argv[1] == "train":
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    for step in (1, 2):
      f.write(json.dumps(dict(kind="train", step=step, loss=1.0 / step)) + "\\n")
    f.write(json.dumps({"kind": "val", "step": 2, "val/accuracy": float(args["config.seed"]) / 10}) + "\\n")
else:
  assert os.path.isfile(os.path.join(wd, "metrics.jsonl")), "eval ran before training"
  os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
  with open(os.path.join(wd, "eval", "synthetic_test.json"), "w") as f:
    json.dump({"factors": {"2": {"accuracy": 0.9, "num_latent": 6.0}}}, f)
"""


def test_run_chains_train_then_eval_in_parallel_and_collects(sweep, tmp_path, capsys):
  fake = tmp_path / "fake.py"
  fake.write_text(FAKE)
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(h):\n  return h.sweep('config.seed', [1, 2, 13])\n")
  root = tmp_path / "R"
  rc = sweep.main(
    [
      "run",
      str(f),
      "--cmd",
      f"python {fake} train",
      "--eval_cmd",
      f"python {fake} eval",
      "--root",
      str(root),
      "--parallel",
      "2",
    ]
  )
  assert rc == 1  # the seed-13 point failed, the others ran through
  out = capsys.readouterr().out
  assert out.count("[sweep] done") == 2 and out.count("FAILED (3)") == 1
  rows = sweep.collect(str(root))
  final = {r["run"]: r for r in rows if r["eval"] == "final"}
  assert sorted(final) == ["000_seed=1", "001_seed=2"]
  assert final["001_seed=2"]["val_accuracy"] == 0.2
  assert final["001_seed=2"]["train_step"] == 2 and final["001_seed=2"]["train_loss"] == 0.5
  evals = [r for r in rows if r["eval"] == "synthetic_test"]
  assert [(r["run"], r["c"], r["accuracy"]) for r in evals] == [
    ("000_seed=1", "2", 0.9),
    ("001_seed=2", "2", 0.9),
  ]
  assert (root / "002_seed=13" / "sweep.log").is_file()
  assert not (root / "002_seed=13" / "eval").exists()  # its eval never ran


def test_emit_slurm_and_pod(sweep, tmp_path):
  f = tmp_path / "s.py"
  f.write_text("def get_sweep(h):\n  return h.sweep('config.seed', [1, 2])\n")
  points = sweep.chains(
    sweep.load_sweep(str(f)), BASE_CMD, "R", "python -m colar_jax eval --seeds=3"
  )
  script = sweep.emit(points, "slurm").splitlines()
  assert "#SBATCH --array=0-1" in script
  case1 = next(ln for ln in script if ln.strip().startswith("1)"))
  train, ev = case1.strip()[3:].removesuffix(" ;;").split(" && ")
  assert train == f"{BASE_CMD} --workdir=R/001_seed=2 --config.seed=2"
  assert ev == "python -m colar_jax eval --seeds=3 --workdir=R/001_seed=2"
  pod = sweep.emit(points, "pod", pod="p1", zone="z").splitlines()
  assert len(pod) == 4 and pod[0].startswith("launch/tpu_pod.sh run p1 z --job 000_seed=1.0 -- ")
  assert pod[1].endswith("eval --seeds=3 --workdir=R/000_seed=1")
  with pytest.raises(ValueError, match="slurm or pod"):
    sweep.emit(points, "k8s")
