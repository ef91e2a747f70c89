"""Run checkpoints (Orbax ``CheckpointManager``): saving, locating, reading, transplanting.

Layout of ``<workdir>/checkpoints/<step>/``:

  params/  trainable parameters (pure dict). Full fine-tuning: the whole model.
           LoRA: only the adapters + latent head; ``meta.base`` points at the
           frozen base weights (random init seed, converted HF dir or an
           ``init_from`` run), which ``train.run.build_model`` recreates exactly.
  train/   optimizer state, micro-step, base RNG key, NaN-guard step.
  data/    the grain iterator state (JSON), so a resumed run sees the same batches.
  meta/    JSON: config, embed_std, base pointer, tokenizer dir, trainable set.

Orbax writes each step into a temporary directory and renames it when
complete, so a run SIGKILLed mid-save resumes from the last COMPLETE step
(stale temporaries are removed on restart). Saves are async: the device ->
host copy happens in ``save`` (so the next step may donate the state) and the
file writes overlap training. Retention: the last ``keep_last`` steps plus the
best ``keep_best`` by the monitored metric.

Separate ``params`` and ``train`` items let evaluation and ``init_from`` read
the weights without knowing the optimizer.

A damaged step (a truncated or zeroed array file, a deleted ``manifest.ocdbt``, a
missing item, an empty metadata file) raises :class:`UnreadableCheckpointError`, one
line naming the step dir and the first line of the underlying error. Training moves
such a step aside (:meth:`Checkpointer.move_aside`: renamed, never deleted) and resumes
from the newest readable one; reading (evaluation, ``init_from``) falls back to the
newest readable step without touching anything. Failed writes (full disk, read-only
filesystem) become :class:`WriteError`, one line with the path and the last complete
step.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from orbax.checkpoint import checkpoint_managers as ocm

from colar_jax import config as cfglib
from colar_jax import paths

ITEMS = ("params", "train", "data", "meta")
CKPT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"
UNREADABLE_TAG = ".unreadable-"  # <step><tag><time>: outside Orbax's step naming


class RunFileError(ValueError):
  """A file of a run (checkpoint step, tokenizer) is missing or unreadable (one line)."""


class UnreadableCheckpointError(RunFileError):
  """A checkpoint step that cannot be read: ``checkpoint <dir> is unreadable (<why>)``."""

  def __init__(self, path: str, reason: str) -> None:
    super().__init__(f"checkpoint {path} is unreadable ({reason})")
    self.path, self.reason = path, reason


class WriteError(RuntimeError):
  """A write failed (full disk, read-only filesystem): ``cannot write <path>: <strerror>
  (last complete checkpoint: step N)``."""


def first_line(e: BaseException, limit: int = 200) -> str:
  """The first non-empty line of an error's message (its type when there is none)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


# errno -> what failed; Orbax / TensorStore report the same as text in a ValueError.
_WRITE_ERRNOS = {
  errno.ENOSPC: "write",
  errno.EROFS: "write",
  errno.EDQUOT: "write",
  errno.EFBIG: "write",
  errno.EACCES: "access",
  errno.EPERM: "access",
}
_ERRNO_OF = {os.strerror(code): code for code in _WRITE_ERRNOS}
_WRITE_TEXT = re.compile(
  r"No space left on device|Read-only file system|Disk quota exceeded|Permission denied"
)
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def write_failure(e: BaseException | None) -> tuple[str, str | None, str] | None:
  """(verb, path, strerror) if ``e`` (or an error it was raised from) is a failed write,
  else None."""
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return _WRITE_ERRNOS[e.errno], e.filename, e.strerror or os.strerror(e.errno)
    m = _WRITE_TEXT.search(str(e))
    if m and not isinstance(e, OSError):
      paths = _QUOTED_PATH.findall(str(e))
      verb = "access" if m.group(0) == "Permission denied" else "write"
      return verb, (paths[-1] if paths else None), m.group(0)
    e = e.__cause__ or e.__context__
  return None


def complete_steps(root: str) -> list[int]:
  """Steps of the finalized step dirs under a ``checkpoints/`` dir, newest first. Orbax
  writes into ``<step>.orbax-checkpoint-tmp*`` and renames when complete, so a plain
  ``<step>`` dir is complete (moved-aside ``<step>.unreadable-*`` dirs are not steps)."""
  names = paths.listdir(root)
  steps = [int(n) for n in names if re.fullmatch(r"\d+", n) and paths.is_dir(f"{root}/{n}")]
  return sorted(steps, reverse=True)


def last_complete_step(workdir: str) -> int | None:
  """The newest complete step of a workdir (or a ``checkpoints/`` dir), None if none."""
  root = paths.join(workdir, CKPT_SUBDIR)
  steps = complete_steps(root if paths.is_dir(root) else workdir)
  return steps[0] if steps else None


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """A failed write inside without a file name (``write`` / ``fsync`` on a full disk, a
  library's "No space left on device" text) becomes an OSError naming ``path``, so the
  one-line WriteError can say which file."""
  try:
    yield
  except Exception as e:
    if isinstance(e, OSError) and e.filename is not None:
      raise
    failure = write_failure(e)
    if failure is None:
      raise
    strerror = failure[2]
    code = e.errno if isinstance(e, OSError) and e.errno else _ERRNO_OF.get(strerror, errno.EIO)
    raise OSError(code, strerror, path) from e


def write_error(
  e: BaseException, workdir: str, *, path: str | None = None, last: int | None = None
) -> WriteError | None:
  """The one-line :class:`WriteError` of a failed write (None if ``e`` is something else).
  ``path`` replaces the one in the error (e.g. the step dir for an Orbax temp file)."""
  if isinstance(e, WriteError):
    return e
  failure = write_failure(e)
  if failure is None:
    return None
  verb, err_path, strerror = failure
  last = last_complete_step(workdir) if last is None else last
  where = "no complete checkpoint yet" if last is None else f"last complete checkpoint: step {last}"
  return WriteError(f"cannot {verb} {path or err_path or workdir}: {strerror} ({where})")


def _key(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every leaf (an abstract tree or Orbax metadata)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): tuple(getattr(v, "shape", ())) for path, v in flat}


def check_fits(path: str, item: str, saved: Any, abstract: Any) -> None:
  """ConfigError naming the first parameter whose path or shape differs between the
  checkpoint's ``item`` metadata and the tree the config builds (another model shape or
  optimizer than the run was started with)."""
  have, want = _shapes(saved), _shapes(abstract)
  if not have:  # no array metadata at all: damage (e.g. no manifest); restoring says what
    return
  what = "parameter" if item == "params" else "optimizer/train state entry"
  # The train item holds the iterate only when the params are an average (ema_decay).
  why = "the model or optimizer" if item == "params" else "the model, optimizer or ema_decay"
  for k, shape in want.items():
    if k not in have:
      raise cfglib.ConfigError(
        f"config: {path} has no {what} {k} that the config's model needs ({why} changed "
        "since the run started)"
      )
    if have[k] != shape:
      raise cfglib.ConfigError(
        f"config: {what} {k} has shape {have[k]} in {path}, the config gives {shape} (the "
        "model shape changed since the run started)"
      )
  extra = sorted(set(have) - set(want))
  if extra:
    raise cfglib.ConfigError(
      f"config: {path} has a {what} {extra[0]} that the config's model lacks ({why} changed "
      "since the run started)"
    )


def monitor_mode(name: str) -> str:
  """Loss-like metrics are minimised, everything else (accuracy) maximised."""
  return "min" if "loss" in name else "max"


class Checkpointer:
  """Thin wrapper: one place that knows the item names and retention policy."""

  def __init__(
    self, directory: str, *, keep_last: int, keep_best: int, monitor: str, async_save: bool = True
  ) -> None:
    self.directory = paths.absolute(directory)
    self.monitor = monitor
    policies: list[Any] = [ocm.LatestN(n=max(1, int(keep_last)))]
    if int(keep_best) > 0:
      policies.append(
        ocm.BestN(
          get_metric_fn=lambda m: m[monitor],
          reverse=monitor_mode(monitor) == "min",
          n=int(keep_best),
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
    self._pending: int | None = None  # the step of an async save in flight
    quiet_abandoned_io()  # a failed async save is one WriteError line, not hundreds

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """Every step of the directory, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _write_failed(self, e: BaseException) -> WriteError | None:
    """The WriteError of a failed save (path: the step dir being written)."""
    step, self._pending = self._pending, None
    done = [s for s in complete_steps(self.directory) if s != step]
    return write_error(
      e,
      self.directory,
      path=self.step_dir(step) if step is not None else None,
      last=done[0] if done else None,
    )

  def _guarded(self, fn: Callable[[], Any]) -> Any:
    try:
      return fn()
    except Exception as e:
      err = self._write_failed(e)
      if err is None:
        raise
      raise err from e

  def save(
    self,
    step: int,
    *,
    params: Any,
    train: dict[str, Any],
    data_state: dict[str, Any] | None,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
  ) -> None:
    """``params``: the trainable parameters; ``train``: the rest of the train state
    (optimizer, counters, RNG) as a dict of arrays."""
    if metrics is not None and self.monitor not in metrics:
      metrics = None
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave(train),
      data=ocp.args.JsonSave(data_state or {}),
      meta=ocp.args.JsonSave(meta),
    )
    # The previous async save is awaited first: its failure names its own step.
    self._guarded(self.manager.wait_until_finished)
    self._pending = step
    self._guarded(lambda: self.manager.save(step, args=args, metrics=metrics))

  def restore(
    self, step: int, abstract_params: Any, abstract_train: dict[str, Any]
  ) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(params, train dict, data iterator state, meta) of ``step``, in the abstract
    trees' shapes and shardings.

    Raises UnreadableCheckpointError if the step is damaged, ConfigError (naming the
    parameter) if it holds another model shape or optimizer state than the abstract trees.
    """
    path = self.step_dir(step)
    with _reading(path):
      saved = {k: _tree_metadata(os.path.join(path, k)) for k in ("params", "train")}
    check_fits(path, "params", saved["params"], abstract_params)
    check_fits(path, "train", saved["train"], abstract_train)
    with _reading(path):
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          train=ocp.args.StandardRestore(abstract_train),
          data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore(),
        ),
      )
      return out["params"], dict(out["train"]), dict(out["data"] or {}), dict(out["meta"])

  def move_aside(self, step: int) -> str:
    """Renames a (damaged) step dir out of Orbax's step naming, so it is neither resumed
    from, nor overwritten, nor deleted by retention; returns the new path."""
    src = self.step_dir(step)
    dst = src + UNREADABLE_TAG + time.strftime("%Y%m%dT%H%M%S")
    n = 1
    while paths.exists(dst):
      dst, n = f"{src}{UNREADABLE_TAG}{time.strftime('%Y%m%dT%H%M%S')}.{n}", n + 1
    try:
      paths.path(src).rename(dst)
    except OSError as e:
      err = write_error(e, self.directory, path=src)
      if err is None:
        raise
      raise err from e
    self.manager.reload()
    return dst

  def close(self) -> None:
    """Waits for the last async save (a failed write: WriteError), then closes."""
    try:
      self._guarded(self.manager.wait_until_finished)
    finally:
      try:
        self.manager.close()
      except Exception:  # the same failed save again; the first error is already raised
        logging.debug("checkpoint manager close failed", exc_info=True)


# ----------------------------------------------------------------------------
# Locating and reading checkpoints
# ----------------------------------------------------------------------------
class _reading:
  """Turns any error of reading a step (Orbax, TensorStore, JSON) into one
  UnreadableCheckpointError line; failed writes and interrupts pass through."""

  def __init__(self, path: str) -> None:
    self.path = path

  def __enter__(self) -> None:
    return None

  def __exit__(self, tp: Any, e: BaseException | None, tb: Any) -> bool:
    if e is None or not isinstance(e, Exception) or isinstance(e, (WriteError, MemoryError)):
      return False
    if isinstance(e, (cfglib.ConfigError, UnreadableCheckpointError)):
      return False
    quiet_abandoned_io(collect=True)
    raise UnreadableCheckpointError(self.path, read_error_reason(e)) from e


_STATUS = re.compile(r"^[A-Z_]{4,}: ")  # absl / TensorStore status codes (NOT_FOUND: ...)
_NOISE = (
  re.compile(r' in OCDBT database at local file "[^"]*"'),
  re.compile(r' of local file "[^"]*"'),
  re.compile(r"\s*\[tensorstore_spec.*$"),
  re.compile(r"\s*See full TensorStore details.*$"),
)


def read_error_reason(e: BaseException) -> str:
  """The most telling first line of a failed read: TensorStore's status line (which
  names the array) when an error in the chain has one, else the error's own."""
  seen, c = set(), e
  while c is not None and id(c) not in seen:
    seen.add(id(c))
    line = first_line(c, limit=10_000)
    if _STATUS.match(line):
      e = c
      break
    c = c.__cause__ or c.__context__
  text = first_line(e, limit=10_000)
  for pat in _NOISE:
    text = pat.sub("", text)
  return text if len(text) <= 200 else text[:197] + "..."


# What Orbax's abandoned async reads / writes of a failed step report as they die: one
# "Exception ignored in ..." (unraisable) each, tens to hundreds of lines in all.
_AFTERMATH = ("Event loop is closed", "Encountered error while reading array index")
_quieted = False


def quiet_abandoned_io(collect: bool = False) -> None:
  """Drops exactly those reports (the failure itself is raised as one line); everything
  else still reaches the previous hooks. ``collect``: let the abandoned coroutines of a
  failed read die now rather than later."""
  global _quieted
  if collect:
    gc.collect()
  if _quieted:
    return
  _quieted = True
  prev_unraisable, prev_thread = sys.unraisablehook, threading.excepthook

  def aftermath(e: BaseException | None) -> bool:
    return any(t in str(e) for t in _AFTERMATH)

  def unraisable(u: Any) -> None:
    if not aftermath(u.exc_value):
      prev_unraisable(u)

  def thread_hook(a: Any) -> None:  # (a failed write in a writer thread: the main one says it)
    if not (aftermath(a.exc_value) or write_failure(a.exc_value) is not None):
      prev_thread(a)

  sys.unraisablehook, threading.excepthook = unraisable, thread_hook
  logging.getLogger("asyncio").addFilter(_NeverRetrieved())


class _NeverRetrieved(logging.Filter):
  """asyncio's "... exception was never retrieved" for the tasks of a failed save."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    never = "exception was never retrieved" in str(record.msg)
    return not (never and (write_failure(exc) is not None or "Event loop is closed" in str(exc)))


def _tree_metadata(item_dir: str) -> Any:
  """The array tree metadata (paths, shapes) of a StandardSave item."""
  if not paths.is_dir(item_dir):
    raise FileNotFoundError(f"no {os.path.basename(item_dir)}/ item")
  reader = ocp.StandardCheckpointer()
  try:
    m = reader.metadata(item_dir)
  finally:
    reader.close()
  return getattr(m, "item_metadata", m)


def step_dirs(path: str) -> list[str]:
  """The step dirs of a workdir, a ``checkpoints/`` dir (newest first) or one step dir."""
  path = paths.absolute(path)
  is_step = re.fullmatch(r"\d+", os.path.basename(path)) and paths.is_dir(path)
  if is_step and not paths.is_dir(paths.join(path, CKPT_SUBDIR)):  # not a workdir "3"
    return [path]
  root = path
  if paths.is_dir(paths.join(path, CKPT_SUBDIR)):
    root = paths.join(path, CKPT_SUBDIR)
  steps = complete_steps(root)
  if not steps:
    raise FileNotFoundError(
      f"{path}: no complete checkpoint (expected a workdir, its {CKPT_SUBDIR}/ dir or a step dir)"
    )
  return [paths.join(root, str(s)) for s in steps]


def resolve(path: str) -> tuple[str, int]:
  """(manager dir, step) of a workdir, a ``checkpoints/`` dir or one step dir.

  A workdir / manager dir resolves to its newest step that has a ``meta/`` item.
  """
  dirs = step_dirs(path)
  ok = [d for d in dirs if paths.is_dir(paths.join(d, "meta"))] or dirs[:1]
  return os.path.dirname(ok[0]), int(os.path.basename(ok[0]))


def _reader(root: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )


def _restore_item(step_dir: str, item: str, restore_args: Any) -> Any:
  root, step = os.path.dirname(step_dir), int(os.path.basename(step_dir))
  with _reading(step_dir):
    if not paths.is_dir(paths.join(step_dir, item)):
      raise FileNotFoundError(f"no {item}/ item")
    mgr = _reader(root)
    try:
      return mgr.restore(step, args=ocp.args.Composite(**{item: restore_args}))[item]
    finally:
      mgr.close()


_warned: set[str] = set()


def readable(path: str, read: Callable[[str], Any]) -> tuple[str, Any]:
  """(step dir, ``read(step dir)``) of the newest step of ``path`` that ``read`` can
  read; each unreadable newer step is a warning (once per process). Read-only: nothing is
  moved. One step dir: its own error."""
  dirs = step_dirs(path)
  err: UnreadableCheckpointError | None = None
  for d in dirs:
    try:
      out = read(d)
    except UnreadableCheckpointError as e:
      if len(dirs) == 1:
        raise
      if e.path not in _warned:
        _warned.add(e.path)
        logging.warning("%s; falling back to the previous step", e)
      err = err or e
      continue
    return d, out
  assert err is not None
  raise RunFileError(f"{err}; no older step of {os.path.dirname(err.path)} is readable either")


def read_step_meta(step_dir: str) -> dict[str, Any]:
  """The ``meta`` item of one step dir (UnreadableCheckpointError if damaged)."""
  meta = _restore_item(step_dir, "meta", ocp.args.JsonRestore())
  if not isinstance(meta, dict) or "config" not in meta:
    raise UnreadableCheckpointError(step_dir, "meta/ holds no run config")
  return dict(meta, checkpoint=step_dir)


def read_meta(path: str) -> dict[str, Any]:
  """The meta of the newest readable step of a workdir / ``checkpoints/`` dir (or of one
  step dir), with ``checkpoint`` (its step dir) and ``newest`` (the newest step dir)."""
  d, meta = readable(path, read_step_meta)
  return dict(meta, newest=step_dirs(path)[0])


def restore_params(path: str, abstract_params: Any) -> Any:
  """Trainable params of ONE step dir into ``abstract_params`` (shapes + shardings)."""
  return _restore_item(path, "params", ocp.args.StandardRestore(abstract_params))


def transplant(
  model: nnx.Module, params: dict[str, Any], what: str, *, complete: bool = False
) -> None:
  """Copies ``params`` (pure dict) into ``model`` by path; a plain ``.../kernel`` may
  fill a LoRA ``.../base/kernel`` (full-FT run -> LoRA run). Fails on leftovers (a ConfigError naming the parameter: a mismatched ``init_from``)."""
  src = traverse_util.flatten_dict(params)
  state = nnx.state(model)
  dst = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  used, out = set(), {}
  for p in dst:
    alias = tuple(x for i, x in enumerate(p) if not (x == "base" and i == len(p) - 2))
    k = p if p in src else alias if alias in src else None
    if k is None:
      if not complete:  # restoring a run's trainable subset onto its rebuilt base
        continue
      # ``complete``: the source is a whole model (init_from). Only modules a new
      # run adds may start fresh: the latent head / projection and LoRA adapters.
      # Anything else missing is a mismatched checkpoint (the reference's
      # strict=False silently kept random weights here).
      if not (p[0] in ("latent_head", "latent_proj") or p[-1] in ("lora_a", "lora_b")):
        raise cfglib.ConfigError(
          f"{what}: checkpoint has no parameter {'/'.join(map(str, p))} that the model needs"
        )
      continue
    if tuple(src[k].shape) != tuple(dst[p].shape):
      raise cfglib.ConfigError(
        f"{what}: {'/'.join(k)} has shape {tuple(src[k].shape)}, the model "
        f"expects {tuple(dst[p].shape)}"
      )
    out[p] = jax.device_put(src[k], dst[p].sharding).astype(dst[p].dtype)
    used.add(k)
  left = sorted("/".join(k) for k in set(src) - used)
  if left:
    raise cfglib.ConfigError(
      f"{what}: parameters the model has no place for: {', '.join(left[:5])}"
      " (a LoRA run can only initialise a run with the same LoRA rank)"
    )
  pure = nnx.to_pure_dict(state)
  flat = traverse_util.flatten_dict(pure)
  flat.update(out)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
