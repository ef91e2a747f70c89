"""Training logs: per-step JSONL, TensorBoard event files, optional W&B, a tqdm progress
bar and the lines people read (validation, the end-of-run summary).

``metrics.jsonl`` in the workdir gets one line per optimizer step (every
step, not only every ``log_every``) plus ``val`` lines; it is the ground
truth the kill-and-resume test compares. On resume it is truncated to the
restored step, so a resumed run's file equals an uninterrupted run's. On a URL
workdir (``gs://``: no append on object stores) the file is kept in memory and the
object rewritten at each write.
TensorBoard (``<workdir>/tb``) and the progress bar are updated every ``log_every``
steps. Each start opens a new event file that begins with what tensorboardX's
``SummaryWriter(purge_step=restored + 1)`` writes (a ``SessionLog.START`` at that step):
TensorBoard's reader then drops the points a run killed after its checkpoint left
behind, so each step shows once. The events go through tensorboardX's synchronous
``EventsWriter`` and are flushed at each update: ``SummaryWriter`` hands them to a
thread, and its ``flush()`` does not wait for that thread's queue, so a SIGKILLed run
lost its last points (BUILD_NOTES "Paths and moved runs"). The run config goes in as
text and hparams at each start. W&B (``train.wandb``) is imported only when enabled.
Only process 0 writes. Every path goes through :mod:`colar_jax.paths` (keeps ``gs://``).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import sys
import time
import uuid
from typing import Any

import jax
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tqdm.auto import tqdm

from colar_jax import config as cfglib
from colar_jax import paths
from colar_jax.weights.checkpoints import writing

JSONL = "metrics.jsonl"
TB_SUBDIR = "tb"
WANDB_ID_FILE = "wandb_run_id"
# Metrics that are fractions in [0, 1]: printed as percentages (the files keep them raw).
PERCENT_SUFFIXES = ("accuracy", "thought_done", "zero_adv_groups")


def _clean(v: Any) -> Any:
  """JSON-safe scalar (NaN/inf as strings so the file stays valid JSON)."""
  v = float(v) if not isinstance(v, (str, bool, int)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


# ----------------------------------------------------------------------------- TensorBoard
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (bool, int, float, str)):
      out[prefix + k] = v
    else:  # tuples, None: hparams take scalars and strings only
      out[prefix + k] = str(v)
  return out


def config_summaries(config: dict[str, Any], metrics: tuple[str, ...]) -> list[Summary]:
  """The run config as a text summary (``config``, indented JSON) and as hparams."""
  body = "\n".join("    " + line for line in json.dumps(config, indent=2).splitlines())
  exp, ssi, sei = tb_summary.hparams(_flat(config), {m: 0.0 for m in metrics})
  return [tb_summary.text("config", body), exp, ssi, sei]


class _EventFile:
  """One start's event file in ``logdir`` (local or a URL tensorboardX writes, e.g.
  ``gs://`` with google-cloud-storage), written synchronously; ``purge_step``: the first
  step of this start, from which older files' points are hidden."""

  def __init__(self, logdir: str, purge_step: int) -> None:
    self.logdir = logdir
    if paths.is_local(logdir):
      paths.makedirs(logdir)
    # The name's own stamp is in whole seconds: the suffix orders (and keeps apart) the
    # files of two starts within one second (the reader reads them in name order).
    self._w = EventsWriter(paths.join(logdir, "events"), f".{time.time_ns()}")
    # What SummaryWriter(purge_step=...) writes first.
    self._event(Event(step=purge_step, file_version="brain.Event:2"))
    self._event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

  def _event(self, ev: Event) -> None:
    ev.wall_time = time.time()
    self._w.write_event(ev)

  def summaries(self, step: int, parts: list[Summary]) -> None:
    for s in parts:
      self._event(Event(step=step, summary=s))
    self._w.flush()

  def close(self) -> None:
    self._w.close()


# ------------------------------------------------------------------------------------ W&B
def import_wandb() -> Any:
  """The wandb module; not installed: one ConfigError line (the CLI checks this before
  any set-up work)."""
  try:
    import wandb  # noqa: PLC0415 (optional dependency, imported only when enabled)
  except ImportError:
    raise cfglib.ConfigError(
      "config.train.wandb: wandb is not installed (pip install wandb), or set "
      "--config.train.wandb=false"
    ) from None
  return wandb


def open_wandb(workdir: str, train: Any, config: dict[str, Any]) -> Any:
  """A W&B run for ``workdir`` (mode ``train.wandb_mode``; ``offline`` needs no network),
  resumed under the id saved in the workdir. W&B writes its own files on local disk:
  in the workdir, or (a URL workdir) in ``./wandb``."""
  wandb = import_wandb()
  id_path = paths.join(workdir, WANDB_ID_FILE)
  if paths.exists(id_path):
    run_id = paths.read_text(id_path).strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with writing(id_path):
      paths.write_text(id_path, run_id + "\n")
  return wandb.init(
    project=str(train.wandb_project),
    mode=str(train.wandb_mode),
    dir=workdir if paths.is_local(workdir) else None,
    id=run_id,
    resume="allow",
    name=posixpath.basename(paths.normalize(workdir).rstrip("/")),
    config=config,
    settings=wandb.Settings(console="off", quiet=True),
  )


# --------------------------------------------------------------------------------- writer
class MetricWriter:
  """JSONL + TensorBoard (+ W&B) writer (no-op on processes other than 0).

  The JSONL is open from the start; TensorBoard and W&B once :meth:`start` knows the
  restored step."""

  def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self.path = paths.join(workdir, JSONL)
    self._tensorboard = tensorboard
    self._tb: _EventFile | None = None
    self._wandb: Any = None
    self._text: str | None = None  # a URL's file as written so far (no append there)

  def start(
    self, resumed: int | None, config: dict[str, Any] | None = None, train: Any = None
  ) -> None:
    """Truncates the logs to ``resumed`` (None: a fresh run, nothing kept), opens the
    event file (and W&B when ``train.wandb``) and logs ``config``."""
    keep = -1 if resumed is None else int(resumed)
    self.truncate_after(keep)
    if not self.active:
      return
    if self._tensorboard:
      tb = paths.join(self.workdir, TB_SUBDIR)
      with writing(tb):
        self._tb = _EventFile(tb, keep + 1)
        metrics = ("train/loss", str(getattr(train, "monitor", "val/accuracy")))
        if config is not None:
          self._tb.summaries(max(keep, 0), config_summaries(config, metrics))
    if train is not None and bool(getattr(train, "wandb", False)):
      self._wandb = open_wandb(self.workdir, train, config or {})

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > ``step`` (left by a run killed after its checkpoint)."""
    if not self.active or not paths.exists(self.path):
      return
    keep = []
    for line in paths.read_text(self.path).splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut by SIGKILL
        continue
      if int(rec.get("step", 0)) <= step:
        keep.append(json.dumps(rec) + "\n")
    with writing(self.path):
      paths.write_text(self.path, "".join(keep))

  def write_lines(self, records: list[dict[str, Any]]) -> None:
    if not self.active or not records:
      return
    text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in records)
    with writing(self.path):
      if paths.is_local(self.path):
        with open(self.path, "a") as f:
          f.write(text)
          f.flush()
          os.fsync(f.fileno())
        return
      if self._text is None:
        self._text = paths.read_text(self.path) if paths.exists(self.path) else ""
      self._text += text
      paths.write_text(self.path, self._text)

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    finite = {
      k: float(v)
      for k, v in values.items()
      if isinstance(v, (int, float)) and math.isfinite(float(v))
    }
    if self._tb is not None and finite:
      with writing(self._tb.logdir):
        parts = [tb_summary.scalar(k, v) for k, v in finite.items()]
        self._tb.summaries(step, [Summary(value=[v for s in parts for v in s.value])])
    if self._wandb is not None and finite:
      self._wandb.log(finite, step=step)

  def close(self) -> None:
    tb, self._tb = self._tb, None
    run, self._wandb = self._wandb, None
    try:
      if tb is not None:
        with writing(tb.logdir):
          tb.close()
    finally:
      if run is not None:
        run.finish()


def read_jsonl(workdir: str, kind: str = "train") -> list[dict[str, Any]]:
  """Lines of ``metrics.jsonl`` of one kind (``train`` / ``val``)."""
  path = paths.join(workdir, JSONL)
  if not paths.exists(path):
    return []
  return [r for r in map(json.loads, paths.read_text(path).splitlines()) if r.get("kind") == kind]


# ---------------------------------------------------------------------- what people read
def pct(x: Any) -> str:
  """A fraction as a percentage, ``0.974`` -> ``97.4%`` (``n/a`` if not finite)."""
  try:
    x = float(x)
  except (TypeError, ValueError):
    return "n/a"
  return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def _num(x: Any) -> str:
  try:
    x = float(x)
  except (TypeError, ValueError):
    return str(x)
  if not math.isfinite(x):
    return "n/a"
  return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def fmt_value(key: str, value: Any) -> str:
  """One metric for people: fractions (accuracy, ...) as ``%``, others to 4 digits."""
  if key.split("/")[-1].endswith(PERCENT_SUFFIXES):
    return pct(value)
  return _num(value)


def format_metrics(values: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
  """``val/accuracy 97.4%, val/loss 0.1234`` (``keys``: these, in order, if present)."""
  names = [k for k in keys if k in values] if keys else sorted(values)
  return ", ".join(f"{k} {fmt_value(k, values[k])}" for k in names)


def is_rl(values: dict[str, Any]) -> bool:
  """Whether a train record is GRPO's (it has rollout rewards)."""
  return "reward" in values


def bar_fields(values: dict[str, Any], rate: dict[str, float]) -> str:
  """The progress bar's postfix: GRPO reward, accuracy and #L; SFT loss and tokens/s."""
  if is_rl(values):
    return (
      f"reward={_num(values.get('reward'))} acc={pct(values.get('accuracy'))} "
      f"#L={float(values.get('num_latent', float('nan'))):.1f}"
    )
  loss = float(values.get("loss", float("nan")))
  return f"loss={loss:.4f} tok/s={rate.get('tokens_per_s', 0.0):.0f}"


def run_summary(phase: str, workdir: str, first_step: int | None, wall_s: float) -> str:
  """The line a training command ends with: steps run, wall time, final metrics."""
  train, val = read_jsonl(workdir, "train"), read_jsonl(workdir, "val")
  last = train[-1] if train else {}
  step = int(last.get("step", first_step or 0))
  ran = step - int(first_step or 0)
  head = f"{phase} done: step {step}"
  head += f" ({ran} this run, resumed at {first_step})" if first_step else f" ({ran} steps)"
  head += f" in {wall_s:.0f} s"
  if ran > 0 and wall_s > 0:
    head += f" ({ran / wall_s:.2f} steps/s)"
  keys = ("reward", "accuracy", "num_latent") if is_rl(last) else ("loss",)
  parts = [format_metrics(last, keys)] if last else []
  if val:
    v = val[-1]
    parts.append(
      f"val at step {v['step']}: "
      + format_metrics(v, ("val/accuracy", "val/num_latent", "val/loss"))
    )
  return "; ".join([head, *[p for p in parts if p]])


class Progress:
  """tqdm bar over optimizer steps: GRPO shows reward, accuracy and #L, SFT the loss and
  tokens/s (the phase is read off the values)."""

  def __init__(self, total: int, initial: int, enabled: bool) -> None:
    self.bar = None
    if enabled and jax.process_index() == 0:
      self.bar = tqdm(
        total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr
      )
    self._t, self._step = time.perf_counter(), initial

  def update(self, step: int, values: dict[str, Any], tokens: float) -> dict[str, float]:
    """Advances to ``step``; returns the throughput since the last update."""
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    rate = dict(steps_per_s=(step - self._step) / dt, tokens_per_s=tokens / dt)
    self._t, self._step = now, step
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_description("rl" if is_rl(values) else "sft", refresh=False)
      self.bar.set_postfix_str(bar_fields(values, rate), refresh=False)
      self.bar.refresh()
    return rate

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
