"""launch/tpu_pod.sh in dry-run mode: the gcloud commands a pod user gets."""

import os
import subprocess

import pytest

RUNTIMES = {
  "v4-32": "tpu-ubuntu2204-base",
  "v5litepod-16": "v2-alpha-tpuv5-lite",
  "v5p-64": "v2-alpha-tpuv5",
  "v6e-8": "v2-alpha-tpuv6e",
}


def _pod(repo_root, *args):
  env = dict(os.environ, DRY_RUN="1")
  return subprocess.run(
    ["bash", "launch/tpu_pod.sh", *args],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )


@pytest.mark.parametrize("accel", sorted(RUNTIMES))
def test_create_picks_the_runtime_of_the_generation(repo_root, accel):
  r = _pod(repo_root, "create", "p", "us-z1", accel)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "p",
    "--zone=us-z1",
    f"--accelerator-type={accel}",
    f"--version={RUNTIMES[accel]}",
  ]


def test_unknown_generation_is_one_error_line(repo_root):
  r = _pod(repo_root, "create", "p", "z", "v9-8")
  assert r.returncode != 0 and r.stdout == ""
  assert len(r.stderr.strip().splitlines()) == 1 and "v9-8" in r.stderr


def test_setup_ships_tracked_files_and_installs_python311(repo_root):
  r = _pod(repo_root, "setup", "p", "z")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].startswith("git ls-files -z | tar")  # tracked files only: no runs/, models/
  assert "scp" in lines[1] and "--worker=all" in lines[1]
  ssh = r.stdout[r.stdout.index("tpu-vm ssh") :]
  assert "--worker=all" in ssh and "python3.11 -m venv .venv" in ssh
  assert "ppa:deadsnakes/ppa" in ssh and "-e \\'.[tpu]\\'" in ssh


def test_run_is_detached_per_worker_and_only_trainers_join_distributed(repo_root):
  train = _pod(
    repo_root,
    "run",
    "p",
    "z",
    "--job",
    "j1",
    "--",
    "python",
    "-m",
    "colar_jax",
    "sft",
    "--config=configs/base.py:tiny",
    "--workdir=gs://b/r",
  )
  assert train.returncode == 0, train.stderr
  out = train.stdout
  assert "--worker=all" in out and "nohup bash -c" in out and "< /dev/null &" in out
  assert "logs/j1.$(hostname).log" in out and "echo $? > logs/j1.$(hostname).exit" in out
  assert "--workdir=gs://b/r --config.distributed.initialize=true" in out
  ev = _pod(
    repo_root, "run", "p", "z", "--", "python", "-m", "colar_jax", "eval", "--workdir=gs://b/r"
  )
  assert ev.returncode == 0 and "distributed.initialize" not in ev.stdout
  assert "logs/job.$(hostname).log" in ev.stdout  # the default job name
  bad = _pod(repo_root, "run", "p", "z", "--")
  assert bad.returncode == 2 and bad.stderr.startswith("error: run:")


def test_status_and_stop(repo_root):
  st = _pod(repo_root, "status", "p", "z", "--job", "j1")
  assert st.returncode == 0 and "logs/j1.*.log" in st.stdout and ".exit" in st.stdout
  stop = _pod(repo_root, "stop", "p", "z")
  assert stop.returncode == 0 and "pkill" in stop.stdout and "--worker=all" in stop.stdout
