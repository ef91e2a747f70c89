"""What both trainers' loops share around the step: resume-or-init, the metric log,
validation (generation metrics and records), checkpoint saves, and closing.

A workdir that already holds a checkpoint resumes from its latest complete step: the
train state, the data iterator's position and ``embed_std`` come back, and metric-log
lines after that step are dropped, so the log continues exactly as if the run had never
stopped. A damaged latest step is named in one line, moved aside (renamed, never
deleted) and the run resumes from the newest readable step, saying so. The workdir's
lock and config-drift check (:mod:`colar_jax.train.workdir`) come before all this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from colar_jax import config as cfglib
from colar_jax.decode.generate import answer_all, make_generate_fn
from colar_jax.decode.rollout import RolloutConfig
from colar_jax.train import state as ts
from colar_jax.train import workdir as workdir_lib
from colar_jax.train.logs import MetricWriter, format_metrics
from colar_jax.train.run import Data, RunSetup, model_config, resolve_embed_std
from colar_jax.weights import checkpoints


class NonFiniteLossError(FloatingPointError):
  """The run hit a NaN/inf loss, gradient or update (message: one line)."""


def _train_items(state: ts.TrainState) -> dict[str, Any]:
  """The checkpoint's ``train`` item. With an average, the checkpoint's ``params`` are
  the average (what every reader of a run wants) and the iterate the optimizer goes on
  from is stored here."""
  items = dict(
    opt_state=state.opt_state, step=state.step, rng=state.rng, nonfinite_step=state.nonfinite_step
  )
  if state.ema is not None:
    items["iterate"] = state.params
  return items


def _restored_state(params: Any, t: dict[str, Any]) -> ts.TrainState:
  """The train state from a checkpoint's ``params`` and ``train`` items."""
  averaged = "iterate" in t
  return ts.TrainState(
    step=t["step"],
    params=t["iterate"] if averaged else params,
    opt_state=t["opt_state"],
    rng=t["rng"],
    nonfinite_step=t["nonfinite_step"],
    ema=params if averaged else None,
  )


@dataclasses.dataclass
class Hooks:
  """The run's checkpoint / metric-log I/O during a loop."""

  ckpt: checkpoints.Checkpointer
  writer: MetricWriter
  state: ts.TrainState
  data_state: Any  # the data iterator's saved position (None on a fresh run)
  embed_std: float
  latest: int | None  # the step resumed from (None on a fresh run)
  meta: dict[str, Any]  # saved with every checkpoint (what load_run rebuilds from)
  last_saved: int | None = None  # the newest checkpoint's step (named in NaN errors)

  def record_val(self, step: int, val: dict[str, float]) -> None:
    self.writer.write_lines([dict(val, kind="val", step=step)])
    self.writer.scalars(step, val)
    logging.info("step %d: %s", step, format_metrics(val))

  def save(
    self, step: int, state: ts.TrainState, it: Any, metrics: dict[str, float] | None
  ) -> None:
    self.ckpt.save(
      step,
      params=ts.inference_params(state),
      train=_train_items(state),
      data_state=it.get_state(),
      meta=dict(self.meta, step=step),
      metrics=metrics,
    )
    self.last_saved = step

  def nonfinite(self, what: str, step: int, rec: dict[str, Any]) -> NonFiniteLossError:
    return NonFiniteLossError(
      f"non-finite loss/update at {what} {step} (loss={rec.get('loss')}, grad_norm="
      f"{rec.get('grad_norm')}); stopped, the last checkpoint (step {self.last_saved}) is "
      "intact"
    )

  def close(self) -> None:
    """Closes the metric log and the checkpoints (waiting for the last save; a failed
    write raises, after both are closed)."""
    try:
      self.ckpt.close()
    except BaseException:
      with contextlib.suppress(Exception):  # the checkpoint's error is the one to report
        self.writer.close()
      raise
    self.writer.close()


def _agree(ok: bool) -> bool:
  """Whether every process could read the step (they must all resume from the same)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


def _resume(ckpt: checkpoints.Checkpointer, abstract: ts.TrainState) -> tuple[int | None, Any]:
  """(step, restored items) of the newest readable step (None: no checkpoint). Damaged
  newer steps are moved aside once an older one has been read; if none can be read,
  nothing is moved and the first error is raised."""
  bad: list[checkpoints.UnreadableCheckpointError] = []
  for step in ckpt.steps():
    try:
      out = ckpt.restore(step, ts.inference_params(abstract), _train_items(abstract))
      err = None
    except checkpoints.UnreadableCheckpointError as e:
      out, err = None, e
    if not _agree(err is None):
      err = err or checkpoints.UnreadableCheckpointError(ckpt.step_dir(step), "on another process")
      logging.warning("%s", err)
      bad.append(err)
      continue
    for e in bad:
      if jax.process_index() == 0:
        moved = ckpt.move_aside(int(os.path.basename(e.path)))
        logging.warning("moved the unreadable %s aside to %s (nothing deleted)", e.path, moved)
    if bad:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("colar_jax: unreadable checkpoints moved aside")
        ckpt.manager.reload()
      logging.warning("resuming from step %d, the newest readable checkpoint", step)
    return step, out
  if bad:
    raise checkpoints.RunFileError(
      f"{bad[0]}; no older step in {ckpt.directory} is readable either (nothing was moved: "
      "move the damaged steps away by hand, or use a fresh --workdir)"
    )
  return None, None


def start(s: RunSetup, workdir: str, tx: Any, shardings: ts.TrainState, **meta: Any) -> Hooks:
  """Opens the checkpoint manager and metric log of ``workdir`` and resumes from its
  newest readable checkpoint, or starts fresh (``embed_std`` from ``resolve_embed_std``).
  Saves the run config. ``meta``: extra entries of the checkpoint meta."""
  run = s.run
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, checkpoints.CKPT_SUBDIR),
    keep_last=run.train.keep_last,
    keep_best=run.train.keep_best,
    monitor=run.train.monitor,
  )
  writer = None
  try:
    writer = MetricWriter(workdir)
    abstract = ts.abstract_train_state(s.params, tx, shardings)
    latest, restored = _resume(ckpt, abstract)
    data_state = None
    if latest is None:
      embed_std = resolve_embed_std(run, s.model)
      state = ts.init_train_state(s.params, tx, int(run.seed), shardings)
    else:
      params, t, data_state, saved = restored
      state = _restored_state(params, t)
      embed_std = float(saved["embed_std"])
      logging.info("resumed from %s/%d", ckpt.directory, latest)
    writer.start(latest, cfglib.to_dict(run), run.train)
    if jax.process_index() == 0:
      path = os.path.join(workdir, checkpoints.CONFIG_FILE)
      with checkpoints.writing(path):
        cfglib.save_json(run, path)
    workdir_lib.record_changes(workdir)
  except BaseException:
    # No background checkpoint threads outlive a failed start (their shutdown noise);
    # the error that got us here is the one to report.
    with contextlib.suppress(Exception):
      ckpt.close()
    if writer is not None:
      with contextlib.suppress(Exception):
        writer.close()
    raise
  trainable = "lora+latent_head" if model_config(run).lora_rank > 0 else "all"
  full_meta = dict(
    embed_std=embed_std,
    base=s.base,
    tokenizer_dir=s.data.tokenizer_dir,
    method=run.method,
    **meta,
    trainable=trainable,
    config=cfglib.to_dict(run),
  )
  return Hooks(ckpt, writer, state, data_state, embed_std, latest, full_meta, last_saved=latest)


def answer_kind(run: cfglib.Run) -> str:
  """How answers of the run's dataset are checked."""
  return "math" if run.data.dataset == "math" else "number"


def generation_metrics(
  run: cfglib.Run, data: Data, model: Any, rcfg: RolloutConfig, *, factor: int, n: int
) -> dict[str, float]:
  """``val/accuracy``, ``val/num_latent`` and ``val/num_latent_correct`` of the sampled
  rollout of ``run.method`` at thinking speed ``factor`` on the first ``n`` val
  questions, seed 0 (the same draws at every evaluation, so val curves compare)."""
  recs = data.val_records(n)
  if not recs:
    return {}
  bs = int(run.data.eval_batch_size)
  gen = make_generate_fn(
    model,
    data.tokenizer,
    run.method,
    rcfg,
    batch_size=bs,
    run=run,
    templates=data.templates,
    buckets=data.buckets,
  )
  sc = answer_all(
    gen,
    [r.question for r in recs],
    [r.answer for r in recs],
    factor=factor,
    seed=0,
    batch_size=bs,
    answer_prefix=data.templates.answer_prefix,
    answer_kind=answer_kind(run),
  )
  n_ok = float(sc.correct.sum())
  return {
    "val/accuracy": float(sc.correct.mean()),
    "val/num_latent": float(sc.num_latent.mean()),
    "val/num_latent_correct": (
      float((sc.num_latent * sc.correct).sum()) / n_ok if n_ok else float("nan")
    ),
  }
