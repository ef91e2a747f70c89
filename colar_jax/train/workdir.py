"""A training run's workdir: created, locked for one trainer at a time, and its config
compared with the one the run started with. Both trainers run inside :func:`claim`.

* Lock: ``<workdir>/train.lock`` (``filelock``: ``flock`` where the filesystem has it,
  else its soft lock), the holder's host, pid, start time and command in
  ``train.lock.json``. A second trainer on the same workdir fails in one line naming the
  holder. ``flock`` dies with its process, so a lock left by a killed trainer is free;
  its stale ``train.lock.json`` is taken over with one line. Only process 0 of a
  multi-process job locks (the others share its filesystem). A ``gs://`` (or other URL)
  workdir cannot be locked (object stores have no ``flock``): it runs unlocked, with one
  warning; the pod launcher starts one trainer per workdir.
* Paths: the workdir goes through :mod:`colar_jax.paths` (``etils.epath``), so
  ``gs://bucket/run`` stays a URL.
* Config drift: a workdir that holds a checkpoint is a resume, and the new config is
  compared with its ``config.json``. Changed keys of :data:`SAFE_TO_CHANGE` are listed
  in one INFO line; any other change fails in one line naming the keys unless
  ``allow_config_change`` (``--allow_config_change``). Once the run has started on the
  new config (``hooks.start`` rewrites ``config.json``), the changes are appended to
  ``config_changes.jsonl``.
* A failed write anywhere inside (full disk, read-only filesystem) becomes one
  :class:`~colar_jax.weights.checkpoints.WriteError` line with the path and the last
  complete checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import filelock
import jax

from colar_jax import config as cfglib
from colar_jax import paths
from colar_jax.weights import checkpoints

LOCK_FILE = "train.lock"
HOLDER_FILE = "train.lock.json"
CHANGES_FILE = "config_changes.jsonl"

# Keys a resume may change: how long to train, how often to log / evaluate / save, what to
# keep, where data and caches live, how the job is laid out on devices and processes, and
# remat (same numbers, other memory). Everything else changes what the run computes
# (weights, data order, optimizer, model), so a resume refuses it without
# --allow_config_change. A trailing "." covers a whole section. Note that with a cosine
# schedule a new num_steps stretches the remaining learning-rate curve.
SAFE_TO_CHANGE = (
  "train.num_steps",
  "rl.num_steps",
  "rl.num_epochs",
  "rl.eval_at_start",
  "train.log_every",
  "train.eval_every",
  "train.eval_examples",
  "train.ckpt_every",
  "train.progress",
  "train.wandb",
  "train.wandb_project",
  "train.wandb_mode",
  "train.keep_last",
  "train.keep_best",
  "data.data_dir",
  "data.eval_batch_size",
  "model.remat",
  "model.attention_impl",
  "jax_cache_dir",
  "mesh.",
  "distributed.",
)


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir (one line naming it)."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read_json(path: str) -> dict[str, Any]:
  try:
    d = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}
  return d if isinstance(d, dict) else {}


def _who(h: dict[str, Any]) -> str:
  since = f", since {h['since']}" if h.get("since") else ""
  return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}{since}"


class WorkdirLock:
  """The exclusive lock of one workdir and its holder record."""

  def __init__(self, workdir: str) -> None:
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.holder_path = os.path.join(workdir, HOLDER_FILE)
    self._lock = filelock.FileLock(self.path, thread_local=False)
    self.holder = dict(
      host=socket.gethostname(),
      pid=os.getpid(),
      since=datetime.datetime.now().isoformat(timespec="seconds"),
      command=" ".join(sys.argv),
    )

  def acquire(self) -> None:
    try:
      self._lock.acquire(blocking=False)
    except filelock.Timeout:
      h = _read_json(self.holder_path)
      if h.get("host") == self.holder["host"] and isinstance(h.get("pid"), int):
        if not _alive(h["pid"]):  # e.g. a child it forked still holds the descriptor
          raise WorkdirBusyError(
            f"workdir {self.workdir} is locked, but its recorded holder ({_who(h)}) is no "
            f"longer running; a process it started may hold {self.path}"
          ) from None
      raise WorkdirBusyError(
        f"workdir {self.workdir} is in use by another trainer ({_who(h)}); wait for it to "
        "finish or pass another --workdir"
      ) from None
    prev = _read_json(self.holder_path)
    if prev and (prev.get("host"), prev.get("pid")) != (self.holder["host"], os.getpid()):
      here = prev.get("host") == self.holder["host"]
      pid = prev.get("pid")
      state = (
        "no longer running"
        if here and isinstance(pid, int) and not _alive(pid)
        else "not holding the lock"
      )
      logging.warning("took over the stale workdir lock of %s (%s)", _who(prev), state)
    try:
      tmp = self.holder_path + ".tmp"
      with checkpoints.writing(tmp), open(tmp, "w") as f:
        json.dump(self.holder, f)
      os.replace(tmp, self.holder_path)
    except BaseException:
      self._lock.release()
      raise

  def release(self) -> None:
    try:
      if _read_json(self.holder_path).get("pid") == os.getpid():
        os.remove(self.holder_path)
    except OSError:  # a read-only or full filesystem: the next holder takes it over
      pass
    finally:
      self._lock.release()


# ----------------------------------------------------------------------------
# Config drift
# ----------------------------------------------------------------------------
def is_safe(key: str, extra_safe: Sequence[str] = ()) -> bool:
  return any(
    key == k or (k.endswith(".") and key.startswith(k)) for k in (*SAFE_TO_CHANGE, *extra_safe)
  )


def config_changes(old: cfglib.Run, new: cfglib.Run) -> dict[str, tuple[Any, Any]]:
  """Dotted key -> (old, new) of every leaf that differs."""
  a, b = cfglib.flatten(old), cfglib.flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def saved_config(workdir: str) -> cfglib.Run | None:
  """The config a run was last started with: ``config.json``, else (unreadable) the
  newest readable checkpoint's."""
  path = paths.join(workdir, checkpoints.CONFIG_FILE)
  try:
    return cfglib.from_config_dict(cfglib.upgrade_legacy(json.loads(paths.read_text(path))))
  except FileNotFoundError:
    pass
  except (OSError, ValueError) as e:  # ConfigError too: not a config of this schema
    logging.warning(
      "%s is unreadable (%s); comparing with the checkpoint's config",
      path,
      checkpoints.first_line(e),
    )
  try:
    return cfglib.from_config_dict(cfglib.upgrade_legacy(checkpoints.read_meta(workdir)["config"]))
  except (FileNotFoundError, checkpoints.RunFileError, cfglib.ConfigError):
    return None


def _show(v: Any) -> str:
  text = repr(v)
  return text if len(text) <= 60 else text[:57] + "..."


def drift_message(unsafe: dict[str, tuple[Any, Any]]) -> str:
  keys = ", ".join(f"config.{k}" for k in unsafe)
  values = "; ".join(f"{_show(o)} -> {_show(n)}" for o, n in unsafe.values())
  verb = "changed" if len(unsafe) == 1 else "have changed"
  return f"{keys} {verb} since the run started ({values})"


def check_drift(
  run: cfglib.Run, workdir: str, *, allow: bool = False, extra_safe: Sequence[str] = ()
) -> dict[str, tuple[Any, Any]]:
  """Compares ``run`` with the config a resumed workdir was started with; returns the
  changes (see the module docstring)."""
  moved = _moved.pop(paths.absolute(workdir), set())
  last = checkpoints.last_complete_step(workdir)
  if last is None:  # nothing to resume: a fresh start may use any config
    return {}
  saved = saved_config(workdir)
  if saved is None:
    return {}
  changes = config_changes(saved, run)
  if not run.model.hf_dir:  # set from the char tokenizer by setup (checked by shape later)
    changes.pop("model.arch.vocab_size", None)
  for key in moved:  # the same weights at a new place (train.run.relocate)
    if key in changes:
      logging.info("config.%s: %s moved to %s", key, *changes.pop(key))
  if not changes:
    return {}
  safe = {k: v for k, v in changes.items() if is_safe(k, extra_safe)}
  unsafe = {k: v for k, v in changes.items() if k not in safe}
  if safe:
    logging.info(
      "config changed since the last start (safe to change): %s",
      "; ".join(f"{k} {_show(o)} -> {_show(n)}" for k, (o, n) in safe.items()),
    )
  if unsafe:
    if not allow:
      raise cfglib.ConfigError(
        f"{drift_message(unsafe)}; pass --allow_config_change to resume anyway"
      )
    logging.warning("%s; resuming anyway (--allow_config_change)", drift_message(unsafe))
  _pending[workdir] = dict(
    time=datetime.datetime.now().isoformat(timespec="seconds"),
    host=socket.gethostname(),
    pid=os.getpid(),
    last_checkpoint=last,
    changes={k: [o, n] for k, (o, n) in changes.items()},
    safe=sorted(safe),
    allowed=sorted(unsafe),
  )
  return changes


_pending: dict[str, dict[str, Any]] = {}  # workdir -> the changes of the resume under way
_moved: dict[str, set[str]] = {}  # workdir -> keys whose target moved (same fingerprint)


def note_moved(workdir: str, keys: Sequence[str]) -> None:
  """Config keys (``init_from``, ``model.hf_dir``, ``data.tokenizer``) that ``train.run``
  pointed at the moved copy of the same content (fingerprint checked): not a change for
  the drift check of ``workdir``."""
  _moved[paths.absolute(workdir)] = set(keys)


def record_changes(workdir: str) -> None:
  """Appends the checked changes of this resume to ``config_changes.jsonl``; called once
  the run has started on the new config (``hooks.start``, with ``config.json``)."""
  entry = _pending.pop(paths.absolute(workdir), None)
  if entry is None or jax.process_index() != 0:
    return
  path = paths.join(workdir, CHANGES_FILE)
  with checkpoints.writing(path):
    paths.append_line(path, json.dumps(entry, default=str))
  if entry["allowed"]:
    logging.info("recorded the changed config in %s", path)


@contextlib.contextmanager
def claim(
  run: cfglib.Run,
  workdir: str,
  *,
  allow_config_change: bool = False,
  extra_safe: Sequence[str] = (),
) -> Iterator[str]:
  """Creates, locks and drift-checks ``workdir`` for one training run; yields its
  absolute path and releases the lock on every way out. A failed write inside becomes
  one WriteError line."""
  path = paths.absolute(workdir)
  lock = None
  try:
    paths.makedirs(path)
    if jax.process_index() == 0 and paths.is_url(path):
      logging.warning(
        "workdir %s is not on a local filesystem: it is not locked against a second trainer",
        path,
      )
    elif jax.process_index() == 0:
      held = WorkdirLock(path)
      held.acquire()
      lock = held
    check_drift(run, path, allow=allow_config_change, extra_safe=extra_safe)
    yield path
  except Exception as e:
    err = checkpoints.write_error(e, path)
    if err is None or err is e:
      raise
    raise err from e
  finally:
    _pending.pop(path, None)
    if lock is not None:
      lock.release()
