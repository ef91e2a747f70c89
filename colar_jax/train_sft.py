"""Supervised training of every method (CoT, CoLaR; baselines plug into ``LOSSES``).

  python -m colar_jax.train_sft --config=configs/base.py:tiny,colar --workdir=DIR \\
      [--config.key=value ...]

A workdir that already holds a checkpoint resumes from its latest complete
step: same batches (grain iterator state), same RNG (per-step keys from the
stored base key), so on a fixed device set the loss curve continues exactly
as if the run had never stopped. The workdir receives ``config.json`` (the
resolved config), ``tokenizer/`` (char tokenizer of the tiny preset),
``metrics.jsonl``, ``tb/`` and ``checkpoints/``.

Test-only hook: the environment variable ``COLAR_DEBUG_KILL_AT_STEP=N`` makes
the process SIGKILL itself right after optimizer step N (checkpoint saves of
earlier steps may still be in flight, which is the point).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any, Iterator

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from colar_jax import checkpointing, configlib
from colar_jax import sharding as shd
from colar_jax import train_state as ts
from colar_jax.losses import LOSSES, LossConfig
import colar_jax.baselines  # noqa: F401,E402  (registers nocot/icot/coconut/distill losses)
from colar_jax.metrics import MetricWriter, Progress

KILL_ENV = "COLAR_DEBUG_KILL_AT_STEP"
_NON_BATCH_KEYS = ("speed", "compression_factor", "stage")


class NonFiniteLossError(FloatingPointError):
  """The run hit a NaN/inf loss, gradient or update (message: one line)."""


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
  tokenizer: Any
  tokenizer_dir: str
  templates: Any
  buckets: Any
  train: Any  # TrainPipeline
  val_source: Any  # random-access val split (records or tfds examples)
  factors: tuple[int, ...]
  baseline: Any = None  # baselines.BaselineConfig for nocot/icot/coconut/distill
  train_source: Any = None  # random-access train split (RL reads questions from it)


def synthetic_task(c: mlc.ConfigDict):
  from colar_jax.data.synthetic import SyntheticTask
  fields = {f.name for f in dataclasses.fields(SyntheticTask)}
  kw: dict[str, Any] = {}
  for k, v in c.data.synthetic.items():
    if k == "num_steps":
      kw["min_steps"] = kw["max_steps"] = int(v)
    elif k in fields:
      kw[k] = v
    else:
      raise ValueError(f"config.data.synthetic.{k}: unknown key; known: num_steps, "
                       f"{', '.join(sorted(fields))}")
  return SyntheticTask(**kw)


def builder_config(c: mlc.ConfigDict) -> Any:
  """The tfds builder config of the run's dataset: the run's own synthetic task (the
  builder's default task is another dataset), else None (the builder's default)."""
  from colar_jax.data import builders
  return builders.synthetic_config(synthetic_task(c)) if c.data.dataset == "synthetic" else None


def _tokenizer(c: mlc.ConfigDict, workdir: str, train_source: Any, templates: Any):
  """HF tokenizer (``data.tokenizer`` / ``model.hf_dir``), the ``init_from`` run's,
  or a char tokenizer trained once and kept in ``<workdir>/tokenizer``."""
  from colar_jax.data import prompts
  from colar_jax.data.records import Record
  path = c.data.tokenizer or c.model.hf_dir
  if not path and c.init_from:
    path = checkpointing.read_meta(c.init_from)["tokenizer_dir"]
  if path:
    return prompts.load_tokenizer(path, pad_as_eos=bool(c.model.hf_dir)), os.path.abspath(path)
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return prompts.load_tokenizer(out), out
  recs = (Record.from_example(train_source[i]) for i in range(len(train_source)))
  if jax.process_index() == 0:
    prompts.train_char_tokenizer(prompts.char_tokenizer_corpus(recs), out, templates=templates)
  return prompts.load_tokenizer(out), out


def setup_data(c: mlc.ConfigDict, workdir: str) -> Data:
  from colar_jax.data import builders, pipeline, prompts
  templates = prompts.PromptTemplates.from_run_config(c)
  buckets = prompts.Buckets(question=tuple(c.data.question_buckets),
                            steps=tuple(c.data.steps_buckets),
                            answer=tuple(c.data.answer_buckets))
  data_dir = c.data.data_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data")
  name = c.data.dataset
  cfg = builder_config(c)
  builders.prepare(name, data_dir, source=c.data.source or None, config=cfg)
  train_src = builders.load_source(name, data_dir, c.data.train_split, config=cfg)
  try:
    val_src = builders.load_source(name, data_dir, c.data.val_split, config=cfg)
  except Exception:  # datasets without a val split: validate on nothing
    val_src = []
  tok, tok_dir = _tokenizer(c, workdir, train_src, templates)
  factors = tuple(configlib.compression_factors(c)) if c.method == "colar" else (1,)
  weights = configlib.compression_factor_weights(c) if c.method == "colar" else ()
  n_proc = jax.process_count()
  bcfg = None
  encode_fn = pipeline.make_sft_encode_fn(tok, templates, buckets, fixed_shapes=n_proc > 1)
  if c.method in _baseline_methods():
    # Baselines plug in WHAT is encoded per epoch (curricula); the step is shared.
    from colar_jax import baselines
    bcfg = baselines.setup(c)
    encode_fn = baselines.make_encode_fn(c.method, tok, templates, buckets, bcfg,
                                         fixed_shapes=n_proc > 1)
  if c.data.batch_size % n_proc:
    raise ValueError(f"config.data.batch_size {c.data.batch_size} is not divisible by "
                     f"{n_proc} processes")
  sampler = pipeline.SpeedSampler(factors=factors,
                                  auto_prob=float(c.colar.auto_prob) if c.method == "colar"
                                  else 0.0, seed=int(c.seed), weights=weights)
  train = pipeline.make_train_pipeline(
      train_src, batch_size=c.data.batch_size // n_proc,
      encode_fn=encode_fn, seed=int(c.seed), speed_sampler=sampler,
      shard_index=jax.process_index(), shard_count=n_proc)
  return Data(tok, tok_dir, templates, buckets, train, val_src, factors, bcfg, train_src)


def _baseline_methods() -> tuple[str, ...]:
  from colar_jax.baselines.schedule import BASELINE_METHODS
  return tuple(BASELINE_METHODS)


# ----------------------------------------------------------------------------
# Validation (the single hook)
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
  c: mlc.ConfigDict
  mesh: Any
  rules: Any
  graphdef: Any
  frozen: Any
  data: Data
  loss_cfg: LossConfig
  eval_fn: Any
  embed_std: float


def validation_metrics(ctx: Ctx, state: ts.TrainState) -> dict[str, float]:
  """Validation of the current params: loss always; generation accuracy (the
  rollout, ``colar_jax.evaluate``) when ``train.monitor`` asks for it.

  Deterministic: fixed speeds per batch and a fixed key, so val curves are
  comparable across evaluations and resumes.
  """
  from colar_jax.data import pipeline, prompts
  c, d = ctx.c, ctx.data
  n = min(int(c.train.eval_examples), len(d.val_source))
  if n == 0:
    return {}
  sampler = pipeline.SpeedSampler(factors=d.factors, seed=int(c.seed) + 7)
  epoch = d.train.epoch_of(int(jax.device_get(state.step)))
  tot, weight = {}, 0.0
  for i, eb in enumerate(pipeline.eval_batches(
      d.val_source, int(c.data.eval_batch_size), shard_index=jax.process_index(),
      shard_count=jax.process_count(), limit=n)):
    speed = sampler(i)
    if d.baseline is not None:  # the curriculum stage the model is at
      from colar_jax import baselines
      enc = baselines.encode_baseline_batch(
          eb.records, d.tokenizer, d.templates, d.buckets, method=c.method,
          stage=d.baseline.stage(c.method, epoch), config=d.baseline,
          fixed_shapes=jax.process_count() > 1)
    else:
      enc = prompts.encode_sft_batch(eb.records, d.tokenizer, d.templates, speed, d.buckets,
                                     fixed_shapes=jax.process_count() > 1)
    for k in ("steps_mask", "answer_mask"):  # padding rows supervise nothing
      enc[k] = enc[k] * eb.valid[:, None].astype(enc[k].dtype)
    cf = int(enc["compression_factor"][0])
    batch = ts.put_batch({k: v for k, v in enc.items() if k not in _NON_BATCH_KEYS},
                         ctx.mesh, ctx.rules)
    m = jax.device_get(ctx.eval_fn(state.params, ctx.frozen, batch, jax.random.key(i),
                                   method=c.method, c=cf))
    w = float(m["n_tokens"])
    weight += w
    for k, v in m.items():
      if k != "n_tokens":
        tot[k] = tot.get(k, 0.0) + float(v) * w
  out = {f"val/{k}": v / max(weight, 1.0) for k, v in tot.items()}
  if c.train.monitor == "val/accuracy":
    out.update(_val_accuracy(ctx, state, n))
  return out


def _val_accuracy(ctx: Ctx, state: ts.TrainState, n: int) -> dict[str, float]:
  from colar_jax import evaluate
  from colar_jax.data.records import Record
  c, d = ctx.c, ctx.data
  recs = [r if isinstance(r, Record) else Record.from_example(r)
          for r in (d.val_source[i] for i in range(n))]
  model = ts.merge_model(ctx.graphdef, state.params, ctx.frozen)
  factor = max(d.factors)
  res = evaluate.evaluate(model, d.tokenizer, [r.question for r in recs],
                          [r.answer for r in recs], c.method, [factor], 1,
                          int(c.data.eval_batch_size), c.rollout, ctx.embed_std,
                          templates=d.templates, buckets=d.buckets, progress=False,
                          log=logging.info, run_config=c)
  m = res["factors"][factor]
  return {"val/accuracy": m["accuracy"], "val/num_latent": m["num_latent"]}


# ----------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------
def build_run(c: mlc.ConfigDict, workdir: str):
  mesh, rules = shd.make_mesh(c), shd.logical_rules(c)
  shd.check_process_layout(mesh)
  data = setup_data(c, workdir)
  if not c.model.hf_dir:
    c.model.arch.vocab_size = len(data.tokenizer)  # the tiny preset's vocab
  n_batch = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  for name in ("batch_size", "eval_batch_size"):
    if c.data[name] % n_batch:
      raise ValueError(f"config.data.{name}={c.data[name]} must be divisible by the mesh "
                       f"batch axes (data x fsdp = {n_batch})")
  model, base = checkpointing.build_model(c, mesh, rules)
  lora = configlib.model_config(c).lora_rank > 0
  graphdef, p_state, frozen = nnx.split(model, ts.trainable_filter(lora), ...)
  p_shard = ts.param_shardings(p_state, mesh, rules)
  params = nnx.to_pure_dict(p_state)
  return mesh, rules, data, model, base, graphdef, params, frozen, p_shard


def resolve_embed_std(c: mlc.ConfigDict, model: Any) -> float:
  """The latent scale of a run: config override > the ``init_from`` run's value (so
  CoT -> CoLaR -> RL share one constant, like the reference's per-model table) >
  the converted dir's ``embed_std.json`` > measured from the embedding matrix."""
  if float(c.model.embed_std) >= 0:
    return float(c.model.embed_std)
  if c.init_from:
    return float(checkpointing.read_meta(c.init_from)["embed_std"])
  if c.model.hf_dir:
    from colar_jax import convert
    std = convert.read_embed_std(c.model.hf_dir)
    if std is not None:
      return std
  return ts.embed_std_of(model)


@dataclasses.dataclass
class RunStart:
  """What both trainers (SFT here, GRPO in ``train_rl``) start their loop from, and the
  run's checkpoint / metric-log I/O during it (validation records, saves, closing)."""

  ckpt: checkpointing.Checkpointer
  writer: MetricWriter
  state: ts.TrainState
  data_state: Any  # the data iterator's saved position (None on a fresh run)
  embed_std: float
  latest: int | None  # the step resumed from (None on a fresh run)
  last_saved: int | None = None  # the newest checkpoint's step (named in NaN errors)

  def record_val(self, step: int, val: dict[str, float]) -> None:
    self.writer.write_lines([dict(val, kind="val", step=step)])
    self.writer.scalars(step, val)
    logging.info("step %d: %s", step, val)

  def save(self, step: int, state: Any, it: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None) -> None:
    self.ckpt.save(step, state, data_state=it.get_state(), meta=dict(meta, step=step),
                   metrics=metrics)
    self.last_saved = step

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()


def start_run(c: mlc.ConfigDict, workdir: str, model: Any, params: Any, tx: Any,
              shardings: Any) -> RunStart:
  """Opens the checkpoint manager and metric log of ``workdir`` and resumes from its
  latest checkpoint (state, data position, ``embed_std``; later log lines dropped), or
  starts fresh (``embed_std`` from :func:`resolve_embed_std`). Saves the run config."""
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, checkpointing.CKPT_SUBDIR), keep_last=c.train.keep_last,
      keep_best=c.train.keep_best, monitor=c.train.monitor)
  writer = MetricWriter(workdir)
  latest = ckpt.latest_step()
  data_state = None
  if latest is None:
    embed_std = resolve_embed_std(c, model)
    state = ts.init_train_state(params, tx, int(c.seed), shardings)
    writer.truncate_after(0)
  else:
    state, data_state, meta = ckpt.restore(latest, ts.abstract_train_state(params, tx,
                                                                           shardings))
    embed_std = float(meta["embed_std"])
    writer.truncate_after(latest)
    logging.info("resumed from %s/%d", ckpt.directory, latest)
  checkpointing.save_run_config(c, workdir)
  return RunStart(ckpt, writer, state, data_state, embed_std, latest, last_saved=latest)


def run_meta(c: mlc.ConfigDict, run: RunStart, data: Data, base: Any, **extra: Any
             ) -> dict[str, Any]:
  """The ``meta`` item saved with every checkpoint (what ``load_run`` rebuilds from)."""
  trainable = "lora+latent_head" if configlib.model_config(c).lora_rank > 0 else "all"
  return dict(embed_std=run.embed_std, base=base, tokenizer_dir=data.tokenizer_dir,
              method=c.method, **extra, trainable=trainable,
              config=checkpointing.config_to_dict(c))


def _host_batch(it: Iterator[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int, float]:
  batch = dict(next(it))
  cf = int(batch["compression_factor"][0])
  for k in _NON_BATCH_KEYS:
    batch.pop(k, None)
  tokens = float(sum(batch[k].sum() for k in batch if k.endswith("_mask")))
  return batch, cf, tokens


def train(c: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged train record."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if c.method not in LOSSES:
    raise ValueError(f"config.method: {c.method!r} has no SFT loss (registered: "
                     f"{', '.join(sorted(LOSSES))})")
  mesh, rules, data, model, base, graphdef, params, frozen, p_shard = build_run(c, workdir)
  num_steps, accum = int(c.train.num_steps), max(1, int(c.optim.grad_accum))
  tx = ts.make_optimizer(c.optim, num_steps)
  shardings = ts.state_shardings(tx, params, p_shard, mesh)
  run = start_run(c, workdir, model, params, tx, shardings)
  writer, state, embed_std = run.writer, run.state, run.embed_std
  del model, params
  loss_cfg = LossConfig.from_config(c, embed_std)
  train_fn, eval_fn = ts.compile_steps(graphdef, tx, loss_cfg, shardings)
  ctx = Ctx(c, mesh, rules, graphdef, frozen, data, loss_cfg, eval_fn, embed_std)
  meta = run_meta(c, run, data, base)
  schedule = ts.lr_schedule(c.optim, num_steps)
  kill_at = int(os.environ.get(KILL_ENV, "-1"))
  it = data.train.iterator(run.data_state or None)
  step = int(jax.device_get(state.step)) // accum
  progress = Progress(num_steps, step, bool(c.train.progress))
  pending: list[tuple[int, list[Any], dict[str, float]]] = []
  last: dict[str, Any] = {}
  tok_since = 0.0

  def flush() -> None:
    """Fetches pending device metrics (one sync), writes them, stops on NaN."""
    nonlocal last
    fetched = jax.device_get([m for _, m, _ in pending])
    records = []
    for (s, _, extra), micro in zip(pending, fetched):
      rec = {k: float(np.mean([float(m[k]) for m in micro])) for k in micro[0] if k != "finite"}
      rec.update(extra, kind="train", step=s)
      records.append(rec)
      if not all(bool(m["finite"]) for m in micro):
        writer.write_lines(records)
        raise NonFiniteLossError(
            f"non-finite loss/update at step {s} (loss={rec['loss']}, grad_norm="
            f"{rec['grad_norm']}); stopped, the last checkpoint (step {run.last_saved}) is "
            "intact")
    writer.write_lines(records)
    pending.clear()
    if records:
      last = records[-1]

  try:
    while step < num_steps:
      micro, tokens, cfs = [], 0.0, []
      for _ in range(accum):
        host, cf, n_tok = _host_batch(it)
        state, m = train_fn(state, frozen, ts.put_batch(host, mesh, rules),
                            method=c.method, c=cf)
        micro.append(m)
        tokens, cfs = tokens + n_tok, cfs + [cf]
      step += 1
      tok_since += tokens
      pending.append((step, micro, dict(c=float(np.mean(cfs)), lr=float(schedule(step - 1)),
                                        tokens=tokens)))
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      do_eval = c.train.eval_every > 0 and (step % c.train.eval_every == 0 or step == num_steps)
      do_save = step % c.train.ckpt_every == 0 or step == num_steps
      if step % c.train.log_every == 0 or do_eval or do_save or step == num_steps:
        flush()
        rate = progress.update(step, last, tok_since)
        tok_since = 0.0
        writer.scalars(step, {f"train/{k}": v for k, v in last.items()
                              if k not in ("kind", "step")} | {f"perf/{k}": v
                                                                for k, v in rate.items()})
      val = None
      if do_eval:
        val = validation_metrics(ctx, state)
        run.record_val(step, val)
      if do_save:
        run.save(step, state, it, meta, val)
  finally:
    progress.close()
    run.close()
  return last


if __name__ == "__main__":
  from colar_jax import cli
  cli.run_training(train)
