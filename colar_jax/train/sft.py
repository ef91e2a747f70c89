"""Supervised training of every method (CoT, CoLaR and the baselines): the loop.

  python -m colar_jax sft --config=configs/base.py:tiny,colar --workdir=DIR \\
      [--config.key=value ...]

A workdir that already holds a checkpoint resumes from its latest complete step: same
batches (grain iterator state), same RNG (per-step keys from the stored base key), so
on a fixed device set the loss curve continues exactly as if the run had never
stopped. The workdir receives ``config.json`` (the resolved config), ``tokenizer/``
(char tokenizer of the tiny preset), ``metrics.jsonl``, ``tb/`` and ``checkpoints/``.

Test-only hook: the environment variable ``COLAR_DEBUG_KILL_AT_STEP=N`` makes the
process SIGKILL itself right after optimizer step N (checkpoint saves of earlier steps
may still be in flight, which is the point).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from colar_jax import config as cfglib
from colar_jax.data import pipeline
from colar_jax.train import state as ts
from colar_jax.train import workdir as workdir_lib
from colar_jax.train.hooks import NonFiniteLossError, generation_metrics, start
from colar_jax.train.logs import Progress
from colar_jax.train.run import RunSetup, check_inputs, relocate, rollout_config, setup

KILL_ENV = "COLAR_DEBUG_KILL_AT_STEP"
_NON_BATCH_KEYS = ("speed", "compression_factor", "stage")

__all__ = ["KILL_ENV", "NonFiniteLossError", "train", "validation_metrics"]


@dataclasses.dataclass
class Validation:
  """What validation needs besides the train state."""

  s: RunSetup
  eval_fn: Any
  embed_std: float


def validation_metrics(v: Validation, state: ts.TrainState) -> dict[str, float]:
  """Validation of the current params: loss always; generation accuracy (the rollout)
  when ``train.monitor`` asks for it.

  Deterministic: fixed speeds per batch and a fixed key, so val curves are comparable
  across evaluations and resumes.
  """
  run, d = v.s.run, v.s.data
  n = min(int(run.train.eval_examples), len(d.val_source))
  if n == 0:
    return {}
  params = ts.inference_params(state)  # what the checkpoint will call params
  sampler = pipeline.SpeedSampler(factors=d.factors, seed=int(run.seed) + 7)
  stage = d.encoder.stage(d.train.epoch_of(int(jax.device_get(state.step))))
  tot, weight = {}, 0.0
  for i, eb in enumerate(
    pipeline.eval_batches(
      d.val_source,
      int(run.data.eval_batch_size),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      limit=n,
    )
  ):
    enc = d.method.encode(run, eb.records, d.encoder.ctx, speed=sampler(i), stage=stage)
    for k in ("steps_mask", "answer_mask"):  # padding rows supervise nothing
      enc[k] = enc[k] * eb.valid[:, None].astype(enc[k].dtype)
    cf = int(enc["compression_factor"][0])
    batch = ts.put_batch(
      {k: x for k, x in enc.items() if k not in _NON_BATCH_KEYS}, v.s.mesh, v.s.rules
    )
    m = jax.device_get(
      v.eval_fn(params, v.s.frozen, batch, jax.random.key(i), method=run.method, c=cf)
    )
    w = float(m["n_tokens"])
    weight += w
    for k, x in m.items():
      if k != "n_tokens":
        tot[k] = tot.get(k, 0.0) + float(x) * w
  out = {f"val/{k}": x / max(weight, 1.0) for k, x in tot.items()}
  if run.train.monitor == "val/accuracy":
    model = ts.merge_model(v.s.graphdef, params, v.s.frozen)
    rc = rollout_config(run.rollout, d.tokenizer, d.templates, v.embed_std)
    out.update(generation_metrics(run, d, model, rc, factor=max(d.factors), n=n))
  return out


def _host_batch(it: Iterator[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int, float]:
  batch = dict(next(it))
  cf = int(batch["compression_factor"][0])
  for k in _NON_BATCH_KEYS:
    batch.pop(k, None)
  tokens = float(sum(batch[k].sum() for k in batch if k.endswith("_mask")))
  return batch, cf, tokens


def train(run: cfglib.Run, workdir: str, *, allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) SFT of ``run.method``; returns the last logged train record.

  The workdir is locked for this run and a resume's config compared with the saved one
  (``train.workdir.claim``; ``allow_config_change`` accepts and records other changes).
  The rollout settings only shape SFT's validation, so they may change on a resume.
  """
  run = relocate(run, workdir)  # a moved run's upstream / weights at their new place
  check_inputs(run)
  with workdir_lib.claim(
    run, workdir, allow_config_change=allow_config_change, extra_safe=("rollout.",)
  ) as path:
    return _train(run, path)


def _train(run: cfglib.Run, workdir: str) -> dict[str, Any]:
  s = setup(run, workdir)
  run = s.run
  num_steps, accum = int(run.train.num_steps), max(1, int(run.optim.grad_accum))
  tx = ts.make_optimizer(run.optim, num_steps)
  ema_decay = float(run.optim.ema_decay)
  shardings = ts.state_shardings(tx, s.params, s.param_shardings, s.mesh, ema=ema_decay > 0)
  hooks = start(s, workdir, tx, shardings)
  writer, state, embed_std = hooks.writer, hooks.state, hooks.embed_std
  settings = s.data.method.loss_settings(run, embed_std)
  train_fn, eval_fn = ts.compile_steps(s.graphdef, tx, settings, shardings, ema_decay)
  val = Validation(s, eval_fn, embed_std)
  schedule = ts.lr_schedule(run.optim, num_steps)
  kill_at = int(os.environ.get(KILL_ENV, "-1"))
  it = s.data.train.iterator(hooks.data_state or None)
  step = int(jax.device_get(state.step)) // accum
  progress = Progress(num_steps, step, bool(run.train.progress))
  pending: list[tuple[int, list[Any], dict[str, float]]] = []
  last: dict[str, Any] = {}
  tok_since = 0.0
  frozen, mesh, rules = s.frozen, s.mesh, s.rules
  s.model = s.params = None  # the trainable params live in the state now

  def flush() -> None:
    """Fetches pending device metrics (one sync), writes them, stops on NaN."""
    nonlocal last
    fetched = jax.device_get([m for _, m, _ in pending])
    records = []
    for (st, _, extra), micro in zip(pending, fetched):
      rec = {k: float(np.mean([float(m[k]) for m in micro])) for k in micro[0] if k != "finite"}
      # lr here, not per step: evaluating the schedule eagerly syncs the host with the
      # device every step (measured ~25% of a demo CoLaR step on 2 cores).
      rec.update(extra, lr=float(schedule(st - 1)), kind="train", step=st)
      records.append(rec)
      if not all(bool(m["finite"]) for m in micro):
        writer.write_lines(records)
        raise hooks.nonfinite("step", st, rec)
    writer.write_lines(records)
    pending.clear()
    if records:
      last = records[-1]

  try:
    while step < num_steps:
      micro, tokens, cfs = [], 0.0, []
      for _ in range(accum):
        host, cf, n_tok = _host_batch(it)
        state, m = train_fn(state, frozen, ts.put_batch(host, mesh, rules), method=run.method, c=cf)
        micro.append(m)
        tokens, cfs = tokens + n_tok, cfs + [cf]
      step += 1
      tok_since += tokens
      pending.append((step, micro, dict(c=float(np.mean(cfs)), tokens=tokens)))
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      t = run.train
      do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or step == num_steps)
      do_save = step % t.ckpt_every == 0 or step == num_steps
      if step % t.log_every == 0 or do_eval or do_save or step == num_steps:
        flush()
        rate = progress.update(step, last, tok_since)
        tok_since = 0.0
        writer.scalars(
          step,
          {f"train/{k}": x for k, x in last.items() if k not in ("kind", "step")}
          | {f"perf/{k}": x for k, x in rate.items()},
        )
      metrics = None
      if do_eval:
        metrics = validation_metrics(val, state)
        hooks.record_val(step, metrics)
      if do_save:
        hooks.save(step, state, it, metrics)
  finally:
    progress.close()
    hooks.close()
  logging.info("sft done at step %d", step)
  return last
