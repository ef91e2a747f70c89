"""``make demo`` end to end at a drastically reduced budget, and the SmolLM2 + GSM8k
config on real weights (slow).

Both run in a subprocess with ONE CPU device (the suite's conftest fakes 8, and the
demo's batch sizes are not meant to be split 8 ways), sharing the suite's persistent
compilation cache so re-runs skip most XLA compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from colar_jax.weights import checkpoints as checkpointing

QUICK_ROWS = {
  ("cot", 1),
  ("colar", 1),
  ("colar", 2),
  ("rl", 1),
  ("rl", 2),
  ("nocot", 1),
  ("coconut", 1),
}


def _env(repo_root) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device, as `make demo`
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(args: list[str], repo_root, timeout: int) -> subprocess.CompletedProcess:
  r = subprocess.run(
    [sys.executable, *args],
    cwd=repo_root,
    env=_env(repo_root),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert r.returncode == 0, f"{args[:3]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


@pytest.mark.slow  # several minutes on 2 CPU cores: `make test-all`, not CI's `make test`
def test_demo_quick_end_to_end_then_reused(tmp_path, repo_root):
  root = tmp_path / "demo"
  cache = str(repo_root / ".cache" / "jax_cache")
  cmd = [
    "-m",
    "colar_jax",
    "demo",
    "--quick",
    "--workdir",
    str(root),
    "--jax_cache_dir",
    cache,
    "--no_progress",
  ]
  r = _run(cmd, repo_root, timeout=600)
  out = r.stdout
  # Every phase trained and left a finished checkpoint at its step count.
  steps = dict(cot=4, colar=4, rl=2, nocot=2, coconut=4)
  for phase, n in steps.items():
    _, step = checkpointing.resolve(str(root / phase))
    assert step == n, (phase, step)
    assert (root / phase / "demo_stamp.json").is_file()
    assert (root / phase / "eval" / "demo_test.json").is_file()
  # Results: one row per (method, c), a table, a PNG plot, and the workdir line.
  res = json.loads((root / "results.json").read_text())
  assert {(r["phase"], r["c"]) for r in res["rows"]} == QUICK_ROWS
  assert len(res["rows"]) == len(QUICK_ROWS)
  cot = next(r for r in res["rows"] if r["phase"] == "cot")
  assert cot["num_latent_ratio"] == pytest.approx(1.0)
  for r in res["rows"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["num_latent"] >= 0
    assert len(r["accuracy_per_seed"]) == 2
  assert res["num_test_questions"] == 16
  png = (root / "accuracy_vs_L.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  md = (root / "results.md").read_text()
  assert "| CoLaR+GRPO  |  2 |" in md and "| Coconut     |  1 |" in md
  assert "| CoLaR+GRPO  |  2 |" in out
  assert out.strip().splitlines()[-1] == f"workdir: {root}"
  for label in ("[1/5] CoT", "[2/5] CoLaR", "[3/5] CoLaR+GRPO", "[4/5] No-CoT", "[5/5] Coconut"):
    assert label in out

  # A second run reuses every finished phase and evaluation: same table, no training.
  r2 = _run(cmd, repo_root, timeout=300)
  assert r2.stdout.count("reusing the finished run") == 5
  assert r2.stdout.count("reusing ") == 10  # + the 5 cached evaluations
  res2 = json.loads((root / "results.json").read_text())
  assert res2["rows"] == res["rows"]
  assert all(res2["reused"].values())


def test_demo_config_phases(tmp_path):
  """Every phase of both pipeline configs builds, and the init_from chain is as documented
  (in the file, and rooted at the demo's workdir by ``demo.phase_config``)."""
  from colar_jax import config, demo

  for path in (demo.DEMO_CONFIG, demo.REPO / "configs" / "smollm2_gsm8k.py"):
    mod = config.load_module(str(path))
    assert tuple(mod.PHASES) == ("cot", "colar", "rl", "nocot", "coconut")
    for phase in mod.PHASES:
      assert mod.TRAINER[phase] == ("rl" if phase == "rl" else "sft")
      for arg in (phase, phase + ",quick"):
        c = mod.get_config(arg)
        assert c.method == ("colar" if phase == "rl" else phase)
        src = mod.INIT_FROM[phase]
        assert c.init_from == (f"{mod.DEFAULT_ROOT}/{src}" if src else "")
        config.from_config_dict(c)  # a valid run
      for quick in (False, True):
        run = demo.phase_config(
          mod,
          phase,
          str(tmp_path),
          quick=quick,
          jax_cache_dir="",
          progress=False,
          overrides=["seed=7"],
        )
        assert isinstance(run, config.Run) and run.seed == 7 and run.jax_cache_dir == ""
        assert run.init_from == (
          str(tmp_path / mod.INIT_FROM[phase]) if mod.INIT_FROM[phase] else ""
        )
        assert run.data.data_dir == str(tmp_path / "data") and run.train.progress is False
    with pytest.raises(ValueError, match="unknown phase"):
      mod.get_config("icot")
  mod = config.load_module(str(demo.DEMO_CONFIG))
  for quick in (False, True):
    c = mod.get_config("rl,quick" if quick else "rl")
    assert c.rl.compression_factor in [int(x) for x in mod.eval_settings(quick)["factors"]]
  with pytest.raises(config.ConfigError, match="--phases"):
    demo.run_pipeline(str(tmp_path / "d"), phases=["colar"])  # its init_from is not listed
  with pytest.raises(config.ConfigError, match="--phases"):
    demo.run_pipeline(str(tmp_path / "d"), phases=["cot", "icot"])


# ----------------------------------------------------------------------------
# SmolLM2-135M + GSM8k on CPU: start, train a few CoLaR steps, evaluate 2 questions
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_dir(repo_root, smollm2_gguf) -> str:
  """The converted SmolLM2 (``.cache/smollm2_orbax``), converted from the wheel's GGUF once."""
  out = repo_root / ".cache" / "smollm2_orbax"
  if (out / "config.json").is_file() and (out / "params").is_dir():
    return str(out)
  gguf = smollm2_gguf
  tmp_out = out.with_name(out.name + ".tmp")
  _run(["-m", "colar_jax", "convert", "hf-to-orbax", str(gguf), str(tmp_out)], repo_root, 600)
  os.replace(tmp_out, out)
  return str(out)


@pytest.mark.slow
def test_smollm2_gsm8k_config_trains_and_evaluates(tmp_path, repo_root, smollm2_dir, shared_data):
  gsm8k = shared_data / "gsm8k"
  if not (gsm8k / "train.jsonl").is_file():
    pytest.skip(f"no GSM8k at {gsm8k}")
  wd, data = tmp_path / "colar", tmp_path / "data"
  cache = str(repo_root / ".cache" / "jax_cache")
  _run(
    [
      "-m",
      "colar_jax",
      "sft",
      "--config=configs/smollm2_gsm8k.py:colar,smoke",
      f"--workdir={wd}",
      "--config.init_from=",
      f"--config.model.hf_dir={smollm2_dir}",
      f"--config.data.source={gsm8k}",
      f"--config.data.data_dir={data}",
      f"--config.jax_cache_dir={cache}",
      "--config.train.progress=false",
    ],
    repo_root,
    600,
  )
  _, step = checkpointing.resolve(str(wd))
  assert step == 3
  lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in lines if x["kind"] == "train"]
  assert [x["step"] for x in train] == [1, 2, 3]
  assert all(x["loss"] == x["loss"] and x["loss"] < 100 for x in train)  # finite
  meta = checkpointing.read_meta(str(wd))
  assert meta["trainable"] == "lora+latent_head" and meta["base"]["kind"] == "hf"
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["model"]["dtype"] == "bfloat16" and cfg["model"]["lora_rank"] == 128

  _run(
    [
      "-m",
      "colar_jax",
      "eval",
      f"--workdir={wd}",
      "--dataset=gsm8k",
      f"--source={gsm8k}",
      f"--data_dir={data}",
      "--max_examples=2",
      "--seeds=1",
      "--compression=2",
      "--no_progress",
    ],
    repo_root,
    600,
  )
  res = json.loads((wd / "eval" / "gsm8k_test.json").read_text())
  assert res["num_questions"] == 2
  m = res["factors"]["2"]
  assert 0.0 <= m["accuracy"] <= 1.0 and 1 <= m["num_latent"] <= 6
