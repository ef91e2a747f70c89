"""Stage 2 of CoLaR: GRPO over the stochastic latent reasoning of a CoLaR-SFT model.

  python -m colar_jax.train_rl --config=configs/base.py:tiny,colar --workdir=DIR \\
      --config.init_from=<CoLaR SFT workdir> [--config.rl.key=value ...]

Per RL step (``c.rl``; the math is in :mod:`colar_jax.rl_experience`):
``rl.questions_per_step`` training questions (grain, seeded, resumable), each
rolled out ``rl.group_size`` times at thinking speed ``rl.compression_factor``;
reward = answer correct (1/0), optionally / #latents; group-normalised
advantages; then ``ppo_epochs`` x (samples / ``exp_batch_size``) jitted,
state-donating PPO-clipped updates on log-probs recomputed by one
teacher-forced forward. The learning rate is ``rl.lr`` (reference 1e-6); the
other ``optim.*`` settings (clip, AdamW betas/decay, schedule) are shared
with SFT.

Everything else is the SFT machinery (``train_sft`` / ``checkpointing`` /
``metrics``): the model is built from ``init_from`` (its tokenizer and
``embed_std`` too), Orbax checkpoints every ``train.ckpt_every`` RL steps with
the grain iterator state, exact resume (rollout keys are ``fold_in(base key,
RL step)``, mini-batch order is seeded by the RL step), the NaN guard, one
``metrics.jsonl`` line per RL step and TensorBoard every ``train.log_every``.
Checkpoint steps are RL steps; ``TrainState.step`` counts optimizer updates.
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
import os
import time
from typing import Any, Callable

import jax
import ml_collections as mlc
import numpy as np

from colar_jax import rl_experience as rlx
from colar_jax import sharding as shd
from colar_jax import train_sft
from colar_jax import train_state as ts
from colar_jax.metrics import Progress
from colar_jax.rollout import RolloutConfig

NonFiniteLossError = train_sft.NonFiniteLossError
_MEAN_KEYS = ("loss", "total_loss", "latent_loss", "answer_loss", "clip_frac_latent",
              "clip_frac_answer", "grad_norm", "kl")


# ----------------------------------------------------------------------------
# Data: prompts + gold answers
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RLPromptEncoder:
  """Grain encode_fn: generation prompts (``question (Thinking speed: c)###``) plus
  the gold answers (numpy object array), one row per question.

  A picklable class (not a closure) like ``pipeline.SftEncoder``.
  """

  tokenizer: Any
  templates: Any
  buckets: Any
  fixed_shapes: bool = False

  def __call__(self, records: list[Any], speed: Any, epoch: int) -> dict[str, np.ndarray]:
    del epoch
    from colar_jax.data import prompts
    enc = prompts.encode_prompt_batch([r.question for r in records], self.tokenizer,
                                      self.templates, speed, self.buckets,
                                      append_separator=True, fixed_shapes=self.fixed_shapes)
    enc["answer"] = np.asarray([r.answer for r in records], dtype=object)
    return enc


def make_rl_pipeline(c: mlc.ConfigDict, data: train_sft.Data, train_source: Any) -> Any:
  """Shuffled question batches of ``rl.questions_per_step`` (per host: / processes)."""
  from colar_jax.data import pipeline
  n_proc = jax.process_count()
  enc = RLPromptEncoder(data.tokenizer, data.templates, data.buckets, fixed_shapes=n_proc > 1)
  sampler = pipeline.SpeedSampler(factors=(int(c.rl.compression_factor),), seed=int(c.seed))
  return pipeline.make_train_pipeline(
      train_source, batch_size=int(c.rl.questions_per_step) // n_proc, encode_fn=enc,
      seed=int(c.seed), speed_sampler=sampler, shard_index=jax.process_index(),
      shard_count=n_proc)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def rl_num_steps(c: mlc.ConfigDict) -> int:
  """``rl.num_epochs`` epochs of ``rl.n_train_samples_per_epoch`` questions, else
  ``train.num_steps``."""
  if int(c.rl.num_epochs) > 0:
    per_epoch = max(1, int(c.rl.n_train_samples_per_epoch) // int(c.rl.questions_per_step))
    return int(c.rl.num_epochs) * per_epoch
  return int(c.train.num_steps)


def rl_optimizer(c: mlc.ConfigDict, num_updates: int):
  """``optim.*`` with the learning rate replaced by ``rl.lr``."""
  optim = mlc.ConfigDict(c.optim.to_dict())
  optim.lr = float(c.rl.lr)
  return ts.make_optimizer(optim, num_updates)


def local_rows(x: jax.Array, mesh: Any, rules: Any) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all of it on one host)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  spec = shd.batch_sharding(mesh, rules, ndim=x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def global_sums(values: dict[str, float]) -> dict[str, float]:
  """Sums of per-host scalars across processes (identity on one host)."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  keys = sorted(values)
  arr = multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float64))
  return dict(zip(keys, np.asarray(arr).reshape(-1, len(keys)).sum(0).tolist()))


def step_stats(correct: np.ndarray, rewards: np.ndarray, n_lat: np.ndarray,
               ans_len: np.ndarray, done: np.ndarray, group_size: int) -> dict[str, float]:
  """Rollout statistics of one step (global means)."""
  groups = rewards.reshape(-1, group_size)
  s = global_sums(dict(
      n=float(correct.size), reward=float(rewards.sum()), accuracy=float(correct.sum()),
      num_latent=float(n_lat.sum()), lat_ok=float((n_lat * correct).sum()),
      answer_length=float(ans_len.sum()), thought_done=float(done.sum()),
      zero=float((groups.max(1) == groups.min(1)).sum()), groups=float(groups.shape[0])))
  n = max(s["n"], 1.0)
  return dict(reward=s["reward"] / n, accuracy=s["accuracy"] / n,
              num_latent=s["num_latent"] / n,
              num_latent_correct=(s["lat_ok"] / s["accuracy"] if s["accuracy"]
                                  else float("nan")),
              answer_length=s["answer_length"] / n, thought_done=s["thought_done"] / n,
              zero_adv_groups=s["zero"] / max(s["groups"], 1.0))


def rollout_key(state: ts.TrainState, step: int) -> jax.Array:
  """Key of RL step ``step``: ``fold_in(base key, step)``, so a resumed run replays it.

  Read from the CURRENT state each step: the update donates the state, its old
  ``rng`` buffer included.
  """
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)


def validate(c: mlc.ConfigDict, data: train_sft.Data, model: Any, rcfg: RolloutConfig,
             embed_std: float) -> dict[str, float]:
  """Accuracy / #L of the sampled rollout on the first ``train.eval_examples`` val
  questions at ``rl.compression_factor``, seed 0 (same draws at every evaluation)."""
  from colar_jax import evaluate
  from colar_jax.data.records import Record
  n = min(int(c.train.eval_examples), len(data.val_source))
  if n == 0:
    return {}
  recs = [r if isinstance(r, Record) else Record.from_example(r)
          for r in (data.val_source[i] for i in range(n))]
  cf = int(c.rl.compression_factor)
  res = evaluate.evaluate(model, data.tokenizer, [r.question for r in recs],
                          [r.answer for r in recs], "colar", [cf], [0],
                          int(c.data.eval_batch_size), rcfg, embed_std,
                          templates=data.templates, buckets=data.buckets, progress=False,
                          answer_kind=_answer_kind(c), log=logging.info)
  m = res["factors"][cf]
  return {"val/accuracy": m["accuracy"], "val/num_latent": m["num_latent"],
          "val/num_latent_correct": m["num_latent_correct"]}


def _answer_kind(c: mlc.ConfigDict) -> str:
  return "math" if c.data.dataset == "math" else "number"


def _check(c: mlc.ConfigDict, rl: rlx.RLConfig, mesh: Any) -> int:
  """Validates the RL batch geometry; returns samples per step (global)."""
  if c.method != "colar":
    raise ValueError(f"train_rl: GRPO is over CoLaR's latent head; config.method is "
                     f"{c.method!r}, expected 'colar'")
  n_q = int(c.rl.questions_per_step)
  n = n_q * rl.group_size
  n_batch = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  if n_q % jax.process_count():
    raise ValueError(f"config.rl.questions_per_step={n_q} is not divisible by "
                     f"{jax.process_count()} processes")
  for name, v in (("questions_per_step x group_size", n), ("exp_batch_size",
                                                            rl.exp_batch_size)):
    if v % n_batch:
      raise ValueError(f"config.rl: {name} = {v} must be divisible by the mesh batch axes "
                       f"(data x fsdp = {n_batch})")
  if n % rl.exp_batch_size:
    raise ValueError(f"config.rl: {n} samples per step not divisible by exp_batch_size "
                     f"{rl.exp_batch_size}")
  return n


# ----------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------
ScoreFn = Callable[[list[str], list[str]], np.ndarray]


def train(c: mlc.ConfigDict, workdir: str, *, score_fn: ScoreFn | None = None
          ) -> dict[str, Any]:
  """Runs (or resumes) GRPO; returns the last train record.

  ``score_fn(texts, golds) -> 1/0 per sample`` (``golds`` one per QUESTION, samples
  question-major) replaces answer checking; tests use it to give an untrained model
  a reward signal.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not c.init_from:
    logging.warning("train_rl: no config.init_from; RL from an un-fine-tuned model has "
                    "(almost) no reward to learn from")
  mesh, rules, data, model, base, graphdef, params, frozen, p_shard = train_sft.build_run(c, workdir)
  rl = rlx.RLConfig.from_config(c.rl)
  n_samples = _check(c, rl, mesh)
  num_steps = rl_num_steps(c)
  n_updates = (n_samples // rl.exp_batch_size) * rl.ppo_epochs
  tx = rl_optimizer(c, num_steps * n_updates)
  shardings = ts.state_shardings(tx, params, p_shard, mesh)
  ref_params = params if rl.kl_weight else None  # frozen SFT policy (state gets a copy)
  run = train_sft.start_run(c, workdir, model, params, tx, shardings)
  writer, state, embed_std, latest = run.writer, run.state, run.embed_std, run.latest
  del model, params
  from colar_jax.data import prompts
  tok = data.tokenizer
  rcfg = RolloutConfig.from_config(
      c.rollout, separator_id=prompts.separator_id(tok, data.templates),
      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, embed_std=embed_std)
  update = rlx.compile_update(graphdef, tx, rl, rcfg, shardings, mesh, rules)
  meta = train_sft.run_meta(c, run, data, base, stage="rl")
  it = make_rl_pipeline(c, data, data.train_source).iterator(run.data_state or None)
  step = int(latest or 0)
  progress = Progress(num_steps, step, bool(c.train.progress))
  n_q, g = int(c.rl.questions_per_step), rl.group_size
  prefix = data.templates.answer_prefix
  last: dict[str, Any] = {}

  def evaluate_now() -> dict[str, float]:
    val = validate(c, data, ts.merge_model(graphdef, state.params, frozen), rcfg, embed_std)
    run.record_val(step, val)
    return val

  try:
    if step == 0 and bool(c.rl.eval_at_start) and int(c.train.eval_every) > 0:
      evaluate_now()
    while step < num_steps:
      t0 = time.perf_counter()
      host = next(it)
      ids, mask = rlx.repeat_groups(host["question_ids"], host["question_mask"], g)
      batch = ts.put_batch({"ids": ids, "mask": mask}, mesh, rules)
      out = rlx.rollout_group(graphdef, state.params, frozen, batch["ids"], batch["mask"],
                              rollout_key(state, step), rcfg)
      a_ids, a_mask, n_lat, done = (local_rows(x, mesh, rules) for x in (
          out.answer_ids, out.answer_mask, out.num_latents, out.thought_done))
      texts = rlx.decode_answers(tok, a_ids, a_mask)
      golds = [str(a) for a in host["answer"]]
      correct = (np.asarray(score_fn(texts, golds), np.float32) if score_fn is not None
                 else rlx.correctness(texts, golds, g, prefix, _answer_kind(c)))
      rewards, adv = rlx.rewards_and_advantages(correct, n_lat, rl)
      adv_g = ts.put_batch({"adv": adv}, mesh, rules)["adv"]
      ref = (rlx.reference_scores(graphdef, ref_params, frozen, batch["ids"], batch["mask"],
                                  out, cfg=rcfg) if ref_params is not None else None)
      exp = rlx.make_experience(batch["ids"], batch["mask"], out, adv_g, ref)
      t1 = time.perf_counter()
      ms = []
      for idx in rlx.minibatch_order(n_samples, rl, (int(c.seed), step)):
        state, m = update(state, frozen, exp, rlx.replicated(mesh, idx))
        ms.append(m)
      ms = jax.device_get(ms)
      step += 1
      rec: dict[str, Any] = dict(kind="train", step=step,
                                 epoch=step * n_q / float(c.rl.n_train_samples_per_epoch))
      rec.update(step_stats(correct, rewards, n_lat, a_mask.sum(-1), done, g))
      rec.update({k: float(np.mean([float(m[k]) for m in ms])) for k in _MEAN_KEYS
                  if k in ms[0]})
      rec["logprob_gap"] = float(ms[0]["logprob_gap"])
      rec["lr"] = float(c.rl.lr)
      rec["time_rollout"], rec["time_update"] = t1 - t0, time.perf_counter() - t1
      writer.write_lines([rec])
      last = rec
      if not all(bool(m["finite"]) for m in ms):
        raise NonFiniteLossError(
            f"non-finite loss/update at RL step {step} (loss={rec.get('loss')}, grad_norm="
            f"{rec.get('grad_norm')}); stopped, the last checkpoint (step {run.last_saved}) is "
            "intact")
      if step % max(1, int(c.train.log_every)) == 0 or step == num_steps:
        progress.update(step, rec, float(a_mask.sum()))
        writer.scalars(step, {f"train/{k}": v for k, v in rec.items()
                              if k not in ("kind", "step")})
      do_eval = int(c.train.eval_every) > 0 and (step % int(c.train.eval_every) == 0
                                                 or step == num_steps)
      val = evaluate_now() if do_eval else None
      if step % int(c.train.ckpt_every) == 0 or step == num_steps:
        run.save(step, state, it, meta, val)
  finally:
    progress.close()
    run.close()
  return last


if __name__ == "__main__":
  from colar_jax import cli
  cli.run_training(train)
