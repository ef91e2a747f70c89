"""Training logs: per-step JSONL, TensorBoard event files, a tqdm progress bar.

``metrics.jsonl`` in the workdir gets one line per optimizer step (every
step, not only every ``log_every``) plus ``val`` lines; it is the ground
truth the kill-and-resume test compares. On resume it is truncated to the
restored step, so a resumed run's file equals an uninterrupted run's.
TensorBoard (tensorboardX, ``<workdir>/tb``) and the progress bar are updated
every ``log_every`` steps. Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from colar_jax.weights.checkpoints import writing

JSONL = "metrics.jsonl"


def _clean(v: Any) -> Any:
  """JSON-safe scalar (NaN/inf as strings so the file stays valid JSON)."""
  v = float(v) if not isinstance(v, (str, bool, int)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """JSONL + TensorBoard writer (no-op on processes other than 0)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, JSONL)
    self._tb = None
    if self.active and tensorboard:
      tb = os.path.join(workdir, "tb")
      with writing(tb):
        self._tb = SummaryWriter(tb, flush_secs=30)

  def truncate_after(self, step: int) -> None:
    """Drops lines of steps > ``step`` (left by a run killed after its checkpoint)."""
    if not self.active or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
          continue
        if int(rec.get("step", 0)) <= step:
          keep.append(json.dumps(rec) + "\n")
    tmp = self.path + ".tmp"
    with writing(tmp), open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write_lines(self, records: list[dict[str, Any]]) -> None:
    if not self.active or not records:
      return
    with writing(self.path), open(self.path, "a") as f:
      for r in records:
        f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if self._tb is None:
      return
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    tb, self._tb = self._tb, None
    if tb is None:
      return
    try:
      with writing(tb.logdir):
        tb.flush()
        tb.close()
    except BaseException:
      _abandon(tb)
      raise


def _abandon(tb: SummaryWriter) -> None:
  """Stops a TensorBoard writer whose final flush failed (a full disk), so that neither
  its atexit hook nor its worker thread retries and prints a traceback at exit."""
  for w in (tb.all_writers or {}).values():
    ev = w.event_writer
    with contextlib.suppress(Exception):
      ev._worker.stop()  # (private: tensorboardX has no public abort)
    ev._closed = True


def read_jsonl(workdir: str, kind: str = "train") -> list[dict[str, Any]]:
  """Lines of ``metrics.jsonl`` of one kind (``train`` / ``val``)."""
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("kind") == kind]


class Progress:
  """tqdm bar over optimizer steps with loss and throughput (tokens/s)."""

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
      self.bar.set_postfix(
        loss=f"{float(values.get('loss', float('nan'))):.4f}",
        tok_s=f"{rate['tokens_per_s']:.0f}",
        refresh=False,
      )
      self.bar.refresh()
    return rate

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
