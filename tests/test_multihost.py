"""Two CPU processes (2 x 4 fake devices, jax.distributed on localhost) train the
same steps as one 8-device process and get the same losses; the real trainer on two
processes, killed mid-run and restarted, resumes on both from one shared checkpoint."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from helpers import tiny_run

from colar_jax.data import builders
from colar_jax.train import run as run_lib


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(n_local: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_local}"
  env["JAX_PLATFORMS"] = "cpu"
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    env.pop(k, None)
  return env


def _losses(out: str) -> list[float]:
  line = [l for l in out.splitlines() if l.startswith("LOSSES ")]
  assert line, out
  return json.loads(line[0][len("LOSSES ") :])


def test_two_processes_equal_one_process(repo_root):
  worker = str(repo_root / "tests" / "helpers" / "multihost_worker.py")
  single = subprocess.run(
    [sys.executable, worker, "1", "0", "0"],
    env=_env(8),
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  port = str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, worker, "2", str(i), port],
      env=_env(4),
      cwd=repo_root,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  ref, multi = _losses(single.stdout), _losses(outs[0][0])
  print("1x8 losses", ref, "\n2x4 losses", multi)
  assert len(ref) == 4
  assert ref[-1] < ref[0]  # it trains
  for a, b in zip(ref, multi):
    assert abs(a - b) < 1e-5


def _sft(repo_root, nproc: int, pid: int, port: str, wd: str, data_dir: str, kill: int = -1):
  worker = str(repo_root / "tests" / "helpers" / "multihost_worker.py")
  env = _env(8 // nproc)
  env["COLAR_DEBUG_KILL_AT_STEP"] = str(kill)
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  return subprocess.Popen(
    [sys.executable, worker, "sft", str(nproc), str(pid), port, wd, data_dir],
    env=env,
    cwd=repo_root,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _both(repo_root, wd: str, data_dir: str, kill: int = -1) -> list[tuple[int, str, str]]:
  port = str(_free_port())
  procs = [_sft(repo_root, 2, i, port, wd, data_dir, kill) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _train_losses(wd: str) -> dict[int, float]:
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


@pytest.mark.slow  # three 2-process trainer launches: ~3 min on this shared 2-core CPU
def test_two_hosts_killed_mid_run_resume_together_to_the_uninterrupted_run(repo_root, tmp_path):
  """The real trainer on 2 processes x 4 devices, one shared workdir: both SIGKILLed at
  step 5 (after the step-4 save was issued), then both restarted. Both hosts resume from
  the same complete checkpoint and the loss curve equals an uninterrupted 2 x 4 run's (a
  1 x 8 run reads other batches: each host reads its shard of the data)."""
  data_dir = str(tmp_path / "data")
  run = tiny_run.run_config(data_dir)  # the data prepared once, not by two hosts at once
  run_lib.prepare_data(
    run.data.dataset, data_dir, source=None, config=builders.builder_config(run.data)
  )
  ref_wd = str(tmp_path / "ref")
  for rc, _o, e in _both(repo_root, ref_wd, data_dir):
    assert rc == 0, e[-3000:]
  want = _train_losses(ref_wd)
  assert sorted(want) == list(range(1, 7))

  wd = str(tmp_path / "multi")
  killed = _both(repo_root, wd, data_dir, kill=5)
  for rc, _o, e in killed:
    assert rc != 0, e[-2000:]  # killed (process 1 may instead lose process 0 first)
  assert killed[0][0] == -9, killed[0][2][-2000:]
  complete = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert complete and max(complete) in (2, 4), complete

  resumed = _both(repo_root, wd, data_dir)
  steps = []
  for rc, out, e in resumed:
    assert rc == 0, e[-3000:]
    assert "DONE process" in out
    m = re.findall(r"resumed from \S+/checkpoints/(\d+)", e)
    assert m, e[-2000:]
    steps.append(int(m[-1]))
  assert steps[0] == steps[1] == max(complete), steps  # the hosts agree
  got = _train_losses(wd)
  assert sorted(got) == list(range(1, 7))
  for s in range(1, 7):
    assert abs(got[s] - want[s]) < 1e-6, (s, got[s], want[s])
