"""Stage 2 of CoLaR: GRPO over the stochastic latent reasoning of a CoLaR-SFT model.

  python -m colar_jax rl --config=configs/base.py:tiny,colar --workdir=DIR \\
      --config.init_from=<CoLaR SFT workdir> [--config.rl.key=value ...]

Per RL step (``c.rl``; the math is in :mod:`colar_jax.train.rl.step`):
``rl.questions_per_step`` training questions (grain, seeded, resumable), each
rolled out ``rl.group_size`` times at thinking speed ``rl.compression_factor``;
reward = answer correct (1/0), optionally / #latents; group-normalised
advantages; then ``ppo_epochs`` x (samples / ``exp_batch_size``) jitted,
state-donating PPO-clipped updates on log-probs recomputed by one
teacher-forced forward, with GRPO's own optimizer ``rl.optim`` (reference: a
constant 1e-6) for ``rl.num_steps`` RL steps.

Everything else is the SFT machinery (``train.run`` / ``train.hooks`` /
``train.logs``): the model is built from ``init_from`` (its tokenizer and
``embed_std`` too), Orbax checkpoints every ``train.ckpt_every`` RL steps with
the grain iterator state, exact resume (rollout keys are ``fold_in(base key,
RL step)``, mini-batch order is seeded by the RL step), the NaN guard, one
``metrics.jsonl`` line per RL step and TensorBoard every ``train.log_every``.
Checkpoint steps are RL steps; ``TrainState.step`` counts optimizer updates. The
``train.*`` cadences (log, eval, checkpoint, retention) apply in RL steps.
Validation (``train.eval_every``): accuracy and #L of the sampled rollout on
the first ``train.eval_examples`` val questions, seed 0, as ``val/accuracy``
(the checkpoint monitor).

Logged per step: ``reward``, ``accuracy``, ``num_latent`` (mean #L),
``num_latent_correct``, ``answer_length``, ``thought_done`` (fraction that chose
to stop), ``zero_adv_groups`` (groups whose rewards are all equal: no signal),
the losses, ``clip_frac_latent/answer``, ``grad_norm`` and ``logprob_gap``:
max |rollout - trainer| log-prob at the FIRST update of the step (before any
gradient step), which must be ~0.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from colar_jax import config as cfglib
from colar_jax.data import pipeline, prompts
from colar_jax.model import sharding as shd
from colar_jax.train import state as ts
from colar_jax.train import workdir as workdir_lib
from colar_jax.train.hooks import NonFiniteLossError, answer_kind, generation_metrics, start
from colar_jax.train.logs import Progress
from colar_jax.train.rl import step as rlx
from colar_jax.train.run import (
  Data,
  check_batch_axes,
  check_inputs,
  relocate,
  rollout_config,
  setup,
)

__all__ = ["NonFiniteLossError", "rl_num_steps", "train"]

_MEAN_KEYS = (
  "loss",
  "total_loss",
  "latent_loss",
  "answer_loss",
  "clip_frac_latent",
  "clip_frac_answer",
  "grad_norm",
  "kl",
)


# ----------------------------------------------------------------------------
# Data: prompts + gold answers
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RLPromptEncoder:
  """Grain encode_fn: generation prompts (``question (Thinking speed: c)###``) plus
  the gold answers (numpy object array), one row per question.

  A picklable class (not a closure) like ``methods.MethodEncoder``.
  """

  tokenizer: Any
  templates: Any
  buckets: Any
  fixed_shapes: bool = False

  def __call__(self, records: list[Any], speed: Any, epoch: int) -> dict[str, np.ndarray]:
    del epoch
    enc = prompts.encode_prompt_batch(
      [r.question for r in records],
      self.tokenizer,
      self.templates,
      speed,
      self.buckets,
      append_separator=True,
      fixed_shapes=self.fixed_shapes,
    )
    enc["answer"] = np.asarray([r.answer for r in records], dtype=object)
    return enc


def make_rl_pipeline(run: cfglib.Run, data: Data) -> Any:
  """Shuffled question batches of ``rl.questions_per_step`` (per host: / processes)."""
  n_proc = jax.process_count()
  enc = RLPromptEncoder(data.tokenizer, data.templates, data.buckets, fixed_shapes=n_proc > 1)
  sampler = pipeline.SpeedSampler(factors=(int(run.rl.compression_factor),), seed=int(run.seed))
  return pipeline.make_train_pipeline(
    data.train_source,
    batch_size=int(run.rl.questions_per_step) // n_proc,
    encode_fn=enc,
    seed=int(run.seed),
    speed_sampler=sampler,
    shard_index=jax.process_index(),
    shard_count=n_proc,
  )


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def rl_num_steps(run: cfglib.Run) -> int:
  """``rl.num_epochs`` epochs of ``rl.n_train_samples_per_epoch`` questions, else
  ``rl.num_steps``."""
  rl = run.rl
  if int(rl.num_epochs) > 0:
    per_epoch = max(1, int(rl.n_train_samples_per_epoch) // int(rl.questions_per_step))
    return int(rl.num_epochs) * per_epoch
  return int(rl.num_steps)


def local_rows(x: jax.Array, mesh: Any, rules: Any) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all of it on one host)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  spec = shd.batch_sharding(mesh, rules, ndim=x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def global_sums(values: dict[str, float]) -> dict[str, float]:
  """Sums of per-host scalars across processes (identity on one host)."""
  if jax.process_count() == 1:
    return values
  keys = sorted(values)
  arr = multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float64))
  return dict(zip(keys, np.asarray(arr).reshape(-1, len(keys)).sum(0).tolist()))


def step_stats(
  correct: np.ndarray,
  rewards: np.ndarray,
  n_lat: np.ndarray,
  ans_len: np.ndarray,
  done: np.ndarray,
  group_size: int,
) -> dict[str, float]:
  """Rollout statistics of one step (global means)."""
  groups = rewards.reshape(-1, group_size)
  s = global_sums(
    dict(
      n=float(correct.size),
      reward=float(rewards.sum()),
      accuracy=float(correct.sum()),
      num_latent=float(n_lat.sum()),
      lat_ok=float((n_lat * correct).sum()),
      answer_length=float(ans_len.sum()),
      thought_done=float(done.sum()),
      zero=float((groups.max(1) == groups.min(1)).sum()),
      groups=float(groups.shape[0]),
    )
  )
  n = max(s["n"], 1.0)
  return dict(
    reward=s["reward"] / n,
    accuracy=s["accuracy"] / n,
    num_latent=s["num_latent"] / n,
    num_latent_correct=(s["lat_ok"] / s["accuracy"] if s["accuracy"] else float("nan")),
    answer_length=s["answer_length"] / n,
    thought_done=s["thought_done"] / n,
    zero_adv_groups=s["zero"] / max(s["groups"], 1.0),
  )


def rollout_key(state: ts.TrainState, step: int) -> jax.Array:
  """Key of RL step ``step``: ``fold_in(base key, step)``, so a resumed run replays it.

  Read from the CURRENT state each step: the update donates the state, its old
  ``rng`` buffer included.
  """
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)


def _check(run: cfglib.Run, mesh: Any) -> int:
  """Validates the RL batch geometry; returns samples per step (global)."""
  rl = run.rl
  if run.method != "colar":
    raise cfglib.ConfigError(
      f"config.method: GRPO is over CoLaR's latent head; got {run.method!r}, expected 'colar'"
    )
  n_q = int(rl.questions_per_step)
  n = n_q * rl.group_size
  if n_q % jax.process_count():
    raise cfglib.ConfigError(
      f"config.rl.questions_per_step={n_q} is not divisible by {jax.process_count()} processes"
    )
  check_batch_axes(
    mesh, **{"rl.questions_per_step x rl.group_size": n, "rl.exp_batch_size": rl.exp_batch_size}
  )
  if n % rl.exp_batch_size:
    raise cfglib.ConfigError(
      f"config.rl.exp_batch_size: {n} samples per step are not divisible by {rl.exp_batch_size}"
    )
  return n


# ----------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------
ScoreFn = Callable[[list[str], list[str]], np.ndarray]


def train(
  run: cfglib.Run,
  workdir: str,
  *,
  score_fn: ScoreFn | None = None,
  allow_config_change: bool = False,
) -> dict[str, Any]:
  """Runs (or resumes) GRPO; returns the last train record.

  ``score_fn(texts, golds) -> 1/0 per sample`` (``golds`` one per QUESTION, samples
  question-major) replaces answer checking; tests use it to give an untrained model
  a reward signal.
  """
  run = relocate(run, workdir)  # a moved run's upstream / weights at their new place
  check_inputs(run)
  with workdir_lib.claim(run, workdir, allow_config_change=allow_config_change) as path:
    return _train(run, path, score_fn)


def _train(run: cfglib.Run, workdir: str, score_fn: ScoreFn | None) -> dict[str, Any]:
  if not run.init_from:
    logging.warning(
      "rl: no config.init_from; RL from an un-fine-tuned model has (almost) no reward to learn from"
    )
  s = setup(run, workdir)
  run, data, mesh, rules, graphdef, frozen = s.run, s.data, s.mesh, s.rules, s.graphdef, s.frozen
  rl = run.rl
  n_samples = _check(run, mesh)
  num_steps = rl_num_steps(run)
  n_updates = (n_samples // rl.exp_batch_size) * rl.ppo_epochs
  tx = ts.make_optimizer(rl.optim, num_steps * n_updates)
  schedule = ts.lr_schedule(rl.optim, num_steps * n_updates)
  shardings = ts.state_shardings(
    tx, s.params, s.param_shardings, mesh, ema=float(rl.optim.ema_decay) > 0
  )
  ref_params = s.params if rl.kl_weight else None  # frozen SFT policy (state gets a copy)
  hooks = start(s, workdir, tx, shardings, stage="rl")
  writer, state, embed_std, latest = hooks.writer, hooks.state, hooks.embed_std, hooks.latest
  s.model = s.params = None
  tok = data.tokenizer
  rcfg = rollout_config(run.rollout, tok, data.templates, embed_std)
  # The experience's draws: with an exploration temperature the end-of-thinking token is
  # drawn from flattened probabilities (an SFT model that nearly never stops early
  # still tries it). Log-probs stay untempered (rollout.py), so the update, the
  # reference scores and validation keep ``rcfg``.
  explore = rcfg
  if rl.explore_eot_temperature:
    explore = dataclasses.replace(rcfg, eot_temperature=float(rl.explore_eot_temperature))
  update = rlx.compile_update(graphdef, tx, rl, rcfg, shardings, mesh, rules)
  it = make_rl_pipeline(run, data).iterator(hooks.data_state or None)
  step = int(latest or 0)
  progress = Progress(num_steps, step, bool(run.train.progress))
  n_q, g = int(rl.questions_per_step), rl.group_size
  prefix = data.templates.answer_prefix
  t = run.train
  last: dict[str, Any] = {}

  def evaluate_now() -> dict[str, float]:
    # The average (when there is one) is what the checkpoint calls params; the rollouts
    # that make experience stay on the iterate (on-policy).
    model = ts.merge_model(graphdef, ts.inference_params(state), frozen)
    val = generation_metrics(
      run, data, model, rcfg, factor=int(rl.compression_factor), n=int(t.eval_examples)
    )
    hooks.record_val(step, val)
    return val

  try:
    if step == 0 and bool(rl.eval_at_start) and int(t.eval_every) > 0:
      evaluate_now()
    while step < num_steps:
      t0 = time.perf_counter()
      host = next(it)
      ids, mask = rlx.repeat_groups(host["question_ids"], host["question_mask"], g)
      batch = ts.put_batch({"ids": ids, "mask": mask}, mesh, rules)
      out = rlx.rollout_group(
        graphdef,
        state.params,
        frozen,
        batch["ids"],
        batch["mask"],
        rollout_key(state, step),
        explore,
      )
      a_ids, a_mask, n_lat, done = (
        local_rows(x, mesh, rules)
        for x in (out.answer_ids, out.answer_mask, out.num_latents, out.thought_done)
      )
      texts = rlx.decode_answers(tok, a_ids, a_mask)
      golds = [str(a) for a in host["answer"]]
      correct = (
        np.asarray(score_fn(texts, golds), np.float32)
        if score_fn is not None
        else rlx.correctness(texts, golds, g, prefix, answer_kind(run))
      )
      rewards, adv = rlx.rewards_and_advantages(correct, n_lat, rl)
      adv_g = ts.put_batch({"adv": adv}, mesh, rules)["adv"]
      ref = (
        rlx.reference_scores(
          graphdef, ref_params, frozen, batch["ids"], batch["mask"], out, cfg=rcfg
        )
        if ref_params is not None
        else None
      )
      exp = rlx.make_experience(batch["ids"], batch["mask"], out, adv_g, ref)
      t1 = time.perf_counter()
      ms = []
      for idx in rlx.minibatch_order(n_samples, rl, (int(run.seed), step)):
        state, m = update(state, frozen, exp, rlx.replicated(mesh, idx))
        ms.append(m)
      ms = jax.device_get(ms)
      step += 1
      rec: dict[str, Any] = dict(
        kind="train", step=step, epoch=step * n_q / float(rl.n_train_samples_per_epoch)
      )
      rec.update(step_stats(correct, rewards, n_lat, a_mask.sum(-1), done, g))
      rec.update({k: float(np.mean([float(m[k]) for m in ms])) for k in _MEAN_KEYS if k in ms[0]})
      rec["logprob_gap"] = float(ms[0]["logprob_gap"])
      rec["lr"] = float(schedule(step * n_updates - 1))
      rec["time_rollout"], rec["time_update"] = t1 - t0, time.perf_counter() - t1
      writer.write_lines([rec])
      last = rec
      if not all(bool(m["finite"]) for m in ms):
        raise hooks.nonfinite("RL step", step, rec)
      if step % max(1, int(t.log_every)) == 0 or step == num_steps:
        progress.update(step, rec, float(a_mask.sum()))
        writer.scalars(step, {f"train/{k}": v for k, v in rec.items() if k not in ("kind", "step")})
      do_eval = int(t.eval_every) > 0 and (step % int(t.eval_every) == 0 or step == num_steps)
      val = evaluate_now() if do_eval else None
      if step % int(t.ckpt_every) == 0 or step == num_steps:
        hooks.save(step, state, it, val)
  finally:
    progress.close()
    hooks.close()
  return last
