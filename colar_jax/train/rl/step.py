"""GRPO experience and the jitted update step (the device side of ``rl/loop.py``).

One RL step of CoLaR (paper Sec. 3.3; reference ``rl_training_step``):

1. :func:`rollout_group` -- every question is repeated ``group_size`` times
   (groups contiguous) and rolled out ONCE with the stochastic latent head. The
   rollout records the behaviour log-probs as it samples: per latent step the
   Gaussian log-density (mean over dims), per answer token the LM log-prob and
   the end-of-thinking decision ``log p(###)`` after the last latent. These are
   the "old" log-probs of PPO; no second forward is needed to get them.
2. :func:`make_experience` -- the host scores the decoded answers (1/0),
   optionally divides by the number of latent steps (``punish_latent_length``)
   and normalises rewards within each group (:func:`grpo.group_advantages`).
3. :func:`rl_update_step`, once per mini-batch of :func:`minibatch_order`
   (``ppo_epochs`` shuffled passes, ``exp_batch_size`` samples each): recompute
   the same log-probs with :func:`rollout.score_rollout` (ONE teacher-forced
   forward, differentiable; never through the sampling ``while_loop``) and take
   an AdamW step on the PPO-clipped surrogate of the latent part plus the answer
   part (:func:`rl_loss`).

``logprob_gap`` = max |rollout-time - trainer-time log-prob| over the
mini-batch, computed with the parameters the step starts from. At the first
mini-batch of a step those are the rollout's parameters, so it must be ~0
(1e-5 in fp32): anything larger means the sampler and the trainer disagree
(positions, masks, temperatures, dtype) and the PPO ratio is biased.

Deviation from the reference: the end-of-thinking log-prob enters the answer
loss only for rows that drew the separator themselves (``thought_done``). A row
cut at ``max_latent_steps`` never took that action; the reference includes it
anyway. The "continue thinking" draws before the last latent are not scored,
as in the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from colar_jax import config as cfglib
from colar_jax.data import answers as answer_lib
from colar_jax.decode.rollout import (
  RolloutConfig,
  RolloutOutput,
  RolloutScores,
  rollout_fn,
  score_rollout,
)
from colar_jax.model import sharding as shd
from colar_jax.train import state as ts
from colar_jax.train.rl import grpo

Metrics = dict[str, jax.Array]


RLConfig = cfglib.RL  # the static GRPO settings are the config section itself


@flax.struct.dataclass
class Experience:
  """Everything an update needs, leading axis = sample (question-major groups)."""

  prompt_ids: jax.Array  # [N, P] left-padded prompts (each question group_size times)
  prompt_mask: jax.Array  # [N, P]
  out: RolloutOutput  # sampled latents / answers and their behaviour log-probs
  advantages: jax.Array  # [N] f32
  ref: RolloutScores | None = None  # frozen reference model's log-probs (kl_weight > 0)


# ----------------------------------------------------------------------------
# Rollout and experience
# ----------------------------------------------------------------------------
def repeat_groups(
  prompt_ids: np.ndarray, prompt_mask: np.ndarray, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """[n, P] -> [n * G, P], each question's copies contiguous (group k = rows kG..kG+G-1)."""
  return (
    np.repeat(np.asarray(prompt_ids), group_size, axis=0),
    np.repeat(np.asarray(prompt_mask), group_size, axis=0),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _rollout_params(
  graphdef: nnx.GraphDef,
  params: ts.Params,
  frozen: nnx.State,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  row_ids: jax.Array,
  *,
  cfg: RolloutConfig,
) -> RolloutOutput:
  """The shared rollout on the (trainable, frozen) split the trainer holds.

  Merging inside jit avoids a host-side ``nnx.split`` of the full model every step.
  """
  model = ts.merge_model(graphdef, params, frozen)
  g, s = nnx.split(model)
  return rollout_fn(g, s, prompt_ids, prompt_mask, rng, row_ids, cfg=cfg)


def rollout_group(
  graphdef: nnx.GraphDef,
  params: ts.Params,
  frozen: nnx.State,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  cfg: RolloutConfig,
) -> RolloutOutput:
  """Stochastic rollout of already repeated prompts ``[N, P]`` (global arrays).

  Row ids are the sample positions 0..N-1, so the G copies of a question draw
  different latents and answers; the step's key (``rng``) changes across steps.
  """
  if cfg.latent_mode != "sampled" or cfg.greedy:
    raise ValueError(
      "GRPO needs the stochastic latent head and sampled answers "
      "(latent_mode='sampled', greedy=False)"
    )
  n = prompt_ids.shape[0]
  rows = jnp.arange(n, dtype=jnp.int32)
  return _rollout_params(graphdef, params, frozen, prompt_ids, prompt_mask, rng, rows, cfg=cfg)


def decode_answers(tokenizer: Any, answer_ids: np.ndarray, answer_mask: np.ndarray) -> list[str]:
  """Generated answer texts (special tokens dropped), as ``evaluate`` decodes them."""
  return [
    tokenizer.decode(ids[m.astype(bool)].tolist(), skip_special_tokens=True)
    for ids, m in zip(answer_ids, answer_mask)
  ]


def correctness(
  texts: Sequence[str],
  golds: Sequence[str],
  group_size: int,
  answer_prefix: str = "Answer:",
  kind: str = "number",
) -> np.ndarray:
  """1/0 per sample; ``golds`` has one answer per QUESTION (sample i -> gold i // G)."""
  out = np.zeros((len(texts),), np.float32)
  for i, t in enumerate(texts):
    pred = answer_lib.extract_answer(t, answer_prefix)
    out[i] = float(answer_lib.is_correct(pred, golds[i // group_size], kind))
  return out


def rewards_and_advantages(
  correct: np.ndarray, num_latents: np.ndarray, rl: RLConfig
) -> tuple[np.ndarray, np.ndarray]:
  """(rewards, advantages) of host-local samples (whole groups, contiguous)."""
  r = grpo.length_aware_rewards(
    jnp.asarray(correct), jnp.asarray(num_latents), rl.punish_latent_length
  )
  adv = grpo.group_advantages(r, rl.group_size)
  return np.asarray(r, np.float32), np.asarray(adv, np.float32)


def make_experience(
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  out: RolloutOutput,
  advantages: jax.Array,
  ref: RolloutScores | None = None,
) -> Experience:
  return Experience(
    prompt_ids=prompt_ids,
    prompt_mask=prompt_mask,
    out=out,
    advantages=advantages.astype(jnp.float32),
    ref=ref,
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def reference_scores(
  graphdef: nnx.GraphDef,
  ref_params: ts.Params,
  frozen: nnx.State,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  out: RolloutOutput,
  *,
  cfg: RolloutConfig,
) -> RolloutScores:
  """Log-probs of the rollout under the frozen reference policy (KL term), once per step."""
  model = ts.merge_model(graphdef, ref_params, frozen)
  return score_rollout(model, prompt_ids, prompt_mask, out, cfg)


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------
def answer_sequence(eot: jax.Array, answer: jax.Array) -> jax.Array:
  """``[eot, answer...]``: the end-of-thinking decision is the answer's first action."""
  return jnp.concatenate([eot[:, None], answer], axis=1)


def _masked_max_abs(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.max(jnp.where(mask, jnp.abs(x), 0.0), initial=0.0)


def rl_loss(
  model: Any, exp: Experience, rl: RLConfig, cfg: RolloutConfig
) -> tuple[jax.Array, Metrics]:
  """GRPO loss of one mini-batch: clipped latent part + clipped answer part (+ KL).

  Both parts are :func:`grpo.clipped_surrogate` with the same advantages, so
  with every advantage 0 (and no KL) the loss and its gradient are exactly 0.
  """
  out = exp.out
  new = score_rollout(model, exp.prompt_ids, exp.prompt_mask, out, cfg)
  lat_mask = out.latent_mask.astype(bool)
  ans_mask = answer_sequence(out.thought_done, out.answer_mask).astype(bool)
  new_ans = answer_sequence(new.eot_logprob, new.answer_logprobs)
  old_ans = answer_sequence(out.eot_logprob, out.answer_logprobs)
  kw = dict(
    clip_eps=rl.clip_eps,
    average_per_token=rl.average_per_token,
    sum_normalizer=rl.sum_normalizer,
    clip_log_ratio=rl.clip_log_ratio,
  )
  lat_loss, lat_clip = grpo.clipped_surrogate(
    new.latent_logprobs, out.latent_logprobs, lat_mask, exp.advantages, **kw
  )
  ans_loss, ans_clip = grpo.clipped_surrogate(new_ans, old_ans, ans_mask, exp.advantages, **kw)
  total = jnp.zeros((), jnp.float32)
  if rl.use_latent_loss:
    total = total + lat_loss
  if rl.use_answer_loss:
    total = total + ans_loss
  metrics: Metrics = dict(
    latent_loss=lat_loss, answer_loss=ans_loss, clip_frac_latent=lat_clip, clip_frac_answer=ans_clip
  )
  if rl.kl_weight and exp.ref is not None:
    kl = grpo.kl_k3(new.latent_logprobs, exp.ref.latent_logprobs, lat_mask) + grpo.kl_k3(
      new_ans, answer_sequence(exp.ref.eot_logprob, exp.ref.answer_logprobs), ans_mask
    )
    total = total + rl.kl_weight * kl
    metrics["kl"] = kl
  # Sampler/trainer agreement on every scored quantity (eot of cut rows included).
  gap_mask = answer_sequence(jnp.ones_like(out.thought_done), out.answer_mask).astype(bool)
  gap = jnp.maximum(
    _masked_max_abs(new.latent_logprobs - out.latent_logprobs, lat_mask),
    _masked_max_abs(new_ans - old_ans, gap_mask),
  )
  metrics["logprob_gap"] = jax.lax.stop_gradient(gap)
  metrics["total_loss"] = total
  return total, metrics


# ----------------------------------------------------------------------------
# Update step
# ----------------------------------------------------------------------------
def take_rows(
  exp: Experience, idx: jax.Array, mesh: Mesh | None = None, rules: Any = None
) -> Experience:
  """Mini-batch ``exp[idx]``, re-sharded over the ``batch`` logical axis."""

  def one(x):
    y = jnp.take(x, idx, axis=0)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, shd.batch_sharding(mesh, rules, ndim=y.ndim))
    return y

  return jax.tree.map(one, exp)


def rl_update_step(
  graphdef: nnx.GraphDef,
  state: ts.TrainState,
  frozen: nnx.State,
  exp: Experience,
  idx: jax.Array,
  *,
  tx: optax.GradientTransformation,
  rl: RLConfig,
  cfg: RolloutConfig,
  mesh: Mesh | None = None,
  rules: Any = None,
) -> tuple[ts.TrainState, Metrics]:
  """One optimizer update on mini-batch ``idx`` of ``exp`` (``ts.guarded_update``)."""
  mb = take_rows(exp, idx, mesh, rules)

  def objective(params):
    return rl_loss(ts.merge_model(graphdef, params, frozen), mb, rl, cfg)

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_state, info = ts.guarded_update(state, loss, grads, tx, float(rl.optim.ema_decay))
  return new_state, dict(metrics, **info)


UpdateFn = Callable[..., tuple[ts.TrainState, Metrics]]


def compile_update(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  rl: RLConfig,
  cfg: RolloutConfig,
  shardings: ts.TrainState | None = None,
  mesh: Mesh | None = None,
  rules: Any = None,
) -> UpdateFn:
  """Jitted ``update(state, frozen, exp, idx)``: state donated (and kept in ``shardings``).

  Compiles once per experience shape (prompt-length bucket); ``idx`` is a
  replicated int32 ``[exp_batch_size]`` array of row indices.
  """
  fn = functools.partial(rl_update_step, graphdef, tx=tx, rl=rl, cfg=cfg, mesh=mesh, rules=rules)
  kw: dict[str, Any] = dict(donate_argnums=(0,))
  if shardings is not None:
    kw["out_shardings"] = (shardings, None)
  return jax.jit(fn, **kw)


def minibatch_order(n: int, rl: RLConfig, seed: Sequence[int]) -> list[np.ndarray]:
  """Row indices of every update of one step: ``ppo_epochs`` shuffled passes.

  Seeded by ``seed`` (run seed, RL step), so a resumed run replays the same order.
  """
  if n % rl.exp_batch_size:
    raise ValueError(
      f"{n} samples per step are not divisible by rl.exp_batch_size {rl.exp_batch_size}"
    )
  rng = np.random.default_rng(list(seed))
  out = []
  for _ in range(rl.ppo_epochs):
    perm = rng.permutation(n).astype(np.int32)
    out += [perm[i : i + rl.exp_batch_size] for i in range(0, n, rl.exp_batch_size)]
  return out


def replicated(mesh: Mesh | None, x: np.ndarray) -> jax.Array:
  """A host array placed replicated on the mesh (or default device without one)."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, NamedSharding(mesh, jax.sharding.PartitionSpec()))
