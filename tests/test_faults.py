"""Faults of issue 16 on the shared tiny run (tests/helpers/tiny_run.py): a second
trainer on a workdir (the lock), a damaged latest checkpoint (fallback, moved aside,
never deleted; read-only actions touch nothing) and a full or read-only filesystem (one
line naming the path and the last complete checkpoint).

The filesystem cases use a small tmpfs (root only: ``mount -t tmpfs``); without root they
fall back to a ``chmod``-ed directory for the read-only case (root ignores permission
bits, so it needs the mount) and skip the full-disk case.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import filelock
import jax
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_run

from colar_jax import cli
from colar_jax.train import logs, sft
from colar_jax.train import workdir as workdir_lib
from colar_jax.weights import checkpoints

pytestmark = pytest.mark.usefixtures("restore_logging")  # main() sets up logging


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
  return tiny_run.trained_run(tmp_path_factory)


def _error(*argv: str) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  msg = e.value.code
  assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
  return msg


def _sft(wd: str, data_dir: str, **over) -> list[str]:
  return [
    "sft",
    f"--config={tiny_run.CONFIG}",
    f"--workdir={wd}",
    *tiny_run.overrides(data_dir, **over),
  ]


def _files(d: str) -> dict[str, int]:
  """Relative path -> size of every file under ``d``."""
  return {
    os.path.relpath(os.path.join(r, f), d): os.path.getsize(os.path.join(r, f))
    for r, _, fs in os.walk(d)
    for f in fs
  }


# ----------------------------------------------------------------------------
# 1. One trainer per workdir
# ----------------------------------------------------------------------------
HOLD = (
  "import filelock, json, os, socket, sys; d = sys.argv[1]; "
  "lock = filelock.FileLock(os.path.join(d, 'train.lock')); lock.acquire(); "
  "json.dump(dict(host=socket.gethostname(), pid=os.getpid(), since='test'), "
  "open(os.path.join(d, 'train.lock.json'), 'w')); print('held', flush=True); sys.stdin.read()"
)


def test_second_trainer_fails_naming_the_holder(trained, tmp_path):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, wd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline() == "held\n"
    log = open(os.path.join(wd, logs.JSONL)).read()
    msg = _error(*_sft(wd, trained[1], **{"train.num_steps": 6}))
    assert msg == (
      f"error: workdir {wd} is in use by another trainer (host {socket.gethostname()}, pid "
      f"{holder.pid}, since test); wait for it to finish or pass another --workdir"
    )
    assert open(os.path.join(wd, logs.JSONL)).read() == log  # the holder's log is untouched
  finally:
    holder.stdin.close()
    holder.wait(timeout=30)


def test_stale_lock_is_taken_over_and_every_exit_releases(trained, tmp_path, caplog):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  pid, host = int(dead.stdout), socket.gethostname()
  sidecar = os.path.join(wd, workdir_lib.HOLDER_FILE)
  with open(sidecar, "w") as f:
    json.dump(dict(host=host, pid=pid, since="yesterday"), f)
  with caplog.at_level(logging.WARNING):
    sft.train(tiny_run.run_config(trained[1]), wd)  # finished already: start and close
  assert (
    f"took over the stale workdir lock of host {host}, pid {pid}, since yesterday (no longer "
    "running)" in caplog.text
  )
  assert not os.path.exists(sidecar)  # released on the way out

  def free() -> bool:
    lock = filelock.FileLock(os.path.join(wd, workdir_lib.LOCK_FILE))
    try:
      lock.acquire(blocking=False)
    except filelock.Timeout:
      return False
    lock.release()
    return True

  assert free()
  with pytest.raises(ValueError, match="optim.lr changed"):  # a refused resume ...
    sft.train(tiny_run.run_config(trained[1], **{"optim.lr": 0.5}), wd)
  assert free() and not os.path.exists(sidecar)  # ... releases it too


# ----------------------------------------------------------------------------
# 2. A damaged latest step
# ----------------------------------------------------------------------------
def _data_files(step: str) -> list[str]:
  """The array data files of a step's params (OCDBT keeps them in ``d/`` dirs; which of
  them a restore reads depends on how the writes were merged)."""
  return glob.glob(os.path.join(step, "params", "**", "d", "*"), recursive=True)


def _truncate(step: str) -> None:
  for p in _data_files(step):
    os.truncate(p, os.path.getsize(p) // 2)


def _zero(step: str) -> None:
  for p in _data_files(step):
    with open(p, "r+b") as f:
      f.write(b"\0" * os.path.getsize(p))


DAMAGE = {
  "truncated params": _truncate,
  "zeroed params": _zero,
  "deleted manifest.ocdbt": lambda step: os.remove(os.path.join(step, "params", "manifest.ocdbt")),
  "missing item": lambda step: shutil.rmtree(os.path.join(step, "train")),
  "empty metadata file": lambda step: open(os.path.join(step, "meta", "metadata"), "w").close(),
}


def _abstract(step_dir: str, item: str):
  """An item's tree of ShapeDtypeStructs from an intact step's own metadata."""
  m = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, item)).item_metadata
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_damage_is_one_unreadable_line(trained, tmp_path, damage):
  root = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(trained[0], "checkpoints"), root)
  params, train = _abstract(f"{root}/2", "params"), _abstract(f"{root}/2", "train")
  DAMAGE[damage](f"{root}/4")
  ckpt = checkpoints.Checkpointer(root, keep_last=2, keep_best=0, monitor="val/loss")
  try:
    with pytest.raises(checkpoints.UnreadableCheckpointError) as e:
      ckpt.restore(4, params, train)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {root}/4 is unreadable (") and "\n" not in msg, msg
    assert len(msg) < 320, msg
    ckpt.restore(2, params, train)  # the older step is fine
  finally:
    ckpt.close()


def test_resume_moves_the_damaged_step_aside(trained, tmp_path, caplog):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  step4 = os.path.join(wd, "checkpoints", "4")
  _truncate(step4)
  damaged = _files(step4)
  with caplog.at_level(logging.WARNING):
    sft.train(tiny_run.run_config(trained[1]), wd)  # back to step 2, then steps 3 and 4
  (moved,) = glob.glob(step4 + checkpoints.UNREADABLE_TAG + "*")
  assert f"checkpoint {step4} is unreadable (" in caplog.text
  assert f"moved the unreadable {step4} aside to {moved} (nothing deleted)" in caplog.text
  assert "resuming from step 2, the newest readable checkpoint" in caplog.text
  assert _files(moved) == damaged  # kept as it was
  assert checkpoints.complete_steps(os.path.join(wd, "checkpoints")) == [4, 2]
  # The resumed steps 3 and 4 are the uninterrupted run's, bit for bit.
  assert logs.read_jsonl(wd) == logs.read_jsonl(trained[0])


def test_read_only_actions_fall_back_without_moving(trained, tmp_path, capsys):
  wd = tiny_run.copy_run(trained[0], str(tmp_path / "run"))
  shutil.rmtree(os.path.join(wd, "checkpoints", "4", "meta"))  # the newest step has no meta/
  before = _files(wd)
  out_dir = str(tmp_path / "eval")
  res = cli.main(
    ["eval", f"--workdir={wd}", "--seeds=1", "--compression=1", "--max_examples=2"]
    + ["--no_progress", f"--out_dir={out_dir}"]
  )
  step2 = os.path.join(wd, "checkpoints", "2")
  out, err = capsys.readouterr()
  assert f"checkpoint {step2} (step 2)\n" in out  # heads the printed table
  assert f"using {step2} (step 2), not the newest step 4 (unreadable)" in err
  assert f"checkpoint {wd}/checkpoints/4 is unreadable (no meta/ item)" in err
  with open(res["summary"]) as f:
    summary = json.load(f)
  assert (summary["checkpoint"], summary["step"]) == (step2, 2)
  with open(res["jsonl"]) as f:
    recs = [json.loads(line) for line in f]
  assert recs and all(r["step"] == 2 and r["checkpoint"] == step2 for r in recs)
  assert _files(wd) == before  # read-only: nothing moved or written


# ----------------------------------------------------------------------------
# 3. A full or read-only filesystem
# ----------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
  """A 16 MiB tmpfs (root, and a kernel that lets us mount), else skip."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  r = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True
  )
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
  try:
    yield str(mnt)
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: str, leave: int) -> None:
  """Fills the filesystem up to ``leave`` free bytes."""
  st = os.statvfs(mnt)
  with open(os.path.join(mnt, "filler"), "wb") as f:
    f.write(b"\1" * max(0, st.f_bavail * st.f_frsize - leave))


def test_full_disk_is_one_line(trained, tmpfs, capfd):
  # At a save: room for the log lines but not for step 6.
  wd = tiny_run.copy_run(trained[0], os.path.join(tmpfs, "run"))
  _fill(tmpfs, leave=200_000)
  msg = _error(*_sft(wd, trained[1], **{"train.num_steps": 6}))
  assert msg == (
    f"error: cannot write {wd}/checkpoints/6: No space left on device (last complete "
    "checkpoint: step 4)"
  )
  assert "Traceback" not in capfd.readouterr().err
  # With room again, the same command resumes from step 4 (nothing was lost).
  os.remove(os.path.join(tmpfs, "filler"))
  cli.main(_sft(wd, trained[1], **{"train.num_steps": 6}))
  assert checkpoints.complete_steps(os.path.join(wd, "checkpoints"))[0] == 6
  # At start: a fresh run on a full disk.
  _fill(tmpfs, leave=0)
  fresh = os.path.join(tmpfs, "fresh")
  msg = _error(*_sft(fresh, trained[1]))
  assert msg.startswith(f"error: cannot write {fresh}/"), msg
  assert msg.endswith(": No space left on device (no complete checkpoint yet)"), msg
  assert "Traceback" not in capfd.readouterr().err


@pytest.fixture
def read_only(tmp_path, request):
  """(a directory to fill, then make read-only; what writes into it then say)."""
  if os.geteuid() == 0:  # root ignores permission bits: a read-only mount
    mnt = request.getfixturevalue("tmpfs")

    def seal() -> None:
      subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)

    return mnt, seal, "cannot write", "Read-only file system"
  d = str(tmp_path / "ro")
  os.mkdir(d)

  def seal() -> None:
    for r, dirs, _ in os.walk(d):
      for x in dirs:
        os.chmod(os.path.join(r, x), 0o555)
    os.chmod(d, 0o555)
    request.addfinalizer(lambda: [os.chmod(r, 0o755) for r, _, _ in os.walk(d)])

  return d, seal, "cannot access", "Permission denied"


def test_read_only_run(trained, read_only, tmp_path, capsys):
  root, seal, verb, strerror = read_only
  wd = tiny_run.copy_run(trained[0], os.path.join(root, "run"))
  data = os.path.join(root, "data")
  shutil.copytree(trained[1], data)
  shutil.copy(os.path.join(tiny_run.REPO, "configs", "base.py"), root)
  seal()
  msg = _error(*_sft(wd, data))  # the lock (as root) or its holder record (chmod) is first
  assert msg.startswith(f"error: {verb} {wd}/train.lock"), msg
  assert msg.endswith(f": {strerror} (last complete checkpoint: step 4)"), msg
  msg = _error("eval", f"--workdir={wd}", f"--data_dir={data}")
  assert (
    msg
    == f"error: cannot write {wd}/eval: {strerror}; pass --out_dir to write the results elsewhere"
  )
  # Evaluation with --out_dir elsewhere, and generation, work on the read-only run.
  res = cli.main(
    ["eval", f"--workdir={wd}", f"--data_dir={data}", "--seeds=1", "--compression=1"]
    + ["--max_examples=2", "--no_progress", f"--out_dir={tmp_path / 'eval'}"]
  )
  assert res["step"] == 4 and res["checkpoint"] == f"{wd}/checkpoints/4"
  cli.main(["generate", f"--workdir={wd}", "--greedy", "1+2"])
  assert "latent steps:" in capsys.readouterr().out
  cli.main(["config", "show", os.path.join(root, "base.py") + ":tiny"])
  assert "optim.lr = " in capsys.readouterr().out
