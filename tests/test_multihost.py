"""Two CPU processes (2 x 4 fake devices, jax.distributed on localhost) train the
same steps as one 8-device process and get the same losses."""

import json
import os
import socket
import subprocess
import sys


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
