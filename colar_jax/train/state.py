"""Functional train state, optimizer, the ONE guarded update, and the SFT step.

Why functional (no ``nnx.Optimizer``): the model is split once into a static
``graphdef``, the trainable parameters (a plain nested dict, so orbax, optax
and sharding trees all see the same structure) and the frozen rest (LoRA base
weights; empty for full fine-tuning). The step merges them back inside jit,
so the donated state holds only what changes, and frozen weights are never
copied, updated or checkpointed.

RNG: the state keeps one base key; the key of a step is ``fold_in(base,
step)``. A resumed run therefore draws exactly the same random labels and
latent samples as an uninterrupted one.

Weight averaging (``optim.ema_decay > 0``): the state also carries an exponential
moving average of the params, updated once per optimizer update (a micro-step of
``grad_accum`` is not one). The iterate is what trains; the average is what the run's
checkpoints call ``params`` (validation, evaluation, export, ``init_from``).

NaN guard: a step whose loss, gradient norm or new parameters are not finite
leaves params, average and optimizer state unchanged and records its step in
``nonfinite_step`` (sticky: later steps are skipped too). The host checks it
whenever it reads metrics, so the run stops naming the first bad step and a
checkpoint can never contain NaN/inf weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colar_jax import methods
from colar_jax.methods.base import Batch, Metrics
from colar_jax.model import CoLaRModel
from colar_jax.model import sharding as shd

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: micro-steps (train_step calls) done
  params: Params  # trainable parameters (pure nested dict)
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2]: raw base key (raw data so orbax can store it)
  nonfinite_step: jax.Array  # int32 []: first micro-step with a non-finite value, -1 = none
  ema: Params | None = None  # EMA of params (optim.ema_decay > 0), else None


def inference_params(state: TrainState) -> Params:
  """The params the run is judged and saved by: the average when there is one."""
  return state.params if state.ema is None else state.ema


def trainable_filter(lora: bool) -> nnx.filterlib.Filter:
  """Full FT: every ``nnx.Param``. LoRA: the adapters plus the modules that are not
  part of the base LM (latent head; ``latent_proj`` of the Coconut/Distill baselines)."""
  if lora:
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("latent_head"), nnx.PathContains("latent_proj"))
  return nnx.Param


def split_model(model: CoLaRModel, lora: bool) -> tuple[nnx.GraphDef, Params, nnx.State]:
  """(graphdef, trainable params as a pure dict, frozen state)."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(lora), ...)
  return graphdef, nnx.to_pure_dict(params), frozen


def merge_model(graphdef: nnx.GraphDef, params: Params, frozen: nnx.State) -> CoLaRModel:
  return nnx.merge(graphdef, nnx.State(params), frozen)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
def lr_schedule(optim: Any, num_steps: int) -> optax.Schedule:
  """Constant (default) or cosine, both after an optional linear warm-up."""
  lr, warm = float(optim.lr), int(optim.warmup_steps)
  if optim.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, num_steps - warm))
  else:
    raise ValueError(f"config.optim.schedule: {optim.schedule!r} (constant, cosine)")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(optim: Any, num_steps: int) -> optax.GradientTransformation:
  """clip -> AdamW (torch defaults: decay on every trainable tensor) [-> MultiSteps]."""
  parts = []
  if float(optim.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  parts.append(
    optax.adamw(
      lr_schedule(optim, num_steps),
      b1=float(optim.b1),
      b2=float(optim.b2),
      eps=1e-8,
      weight_decay=float(optim.weight_decay),
    )
  )
  tx = optax.chain(*parts)
  if int(optim.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(optim.grad_accum))
  return tx


# ----------------------------------------------------------------------------
# Shardings and initialisation
# ----------------------------------------------------------------------------
def param_shardings(model_state: nnx.State, mesh: Mesh, rules) -> Any:
  """NamedSharding tree (pure-dict form) from the variables' logical names."""
  return nnx.to_pure_dict(shd.state_shardings(model_state, mesh, rules))


def state_shardings(
  tx: optax.GradientTransformation, params: Params, p_shard: Any, mesh: Mesh, ema: bool = False
) -> TrainState:
  """Optimizer moments and the average follow their parameter; counters and RNG are
  replicated. ``ema``: whether the state carries an average (``optim.ema_decay > 0``)."""
  rep = NamedSharding(mesh, P())
  abs_opt = jax.eval_shape(tx.init, params)
  opt_shard = optax.tree_map_params(
    tx, lambda _, s: s, abs_opt, p_shard, transform_non_params=lambda _: rep
  )
  return TrainState(
    step=rep,
    params=p_shard,
    opt_state=opt_shard,
    rng=rep,
    nonfinite_step=rep,
    ema=p_shard if ema else None,
  )


def _fresh_state(
  params: Params, tx: optax.GradientTransformation, seed: int, ema: bool
) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
    nonfinite_step=jnp.full((), -1, jnp.int32),
    ema=jax.tree.map(jnp.copy, params) if ema else None,  # the average starts at the init
  )


def init_train_state(
  params: Params, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
  """A fresh state placed per ``shardings`` (params are copied, not aliased); it has an
  average iff ``shardings`` has one."""
  fresh = functools.partial(_fresh_state, tx=tx, seed=seed, ema=shardings.ema is not None)
  return jax.jit(fresh, out_shardings=shardings)(params)


def abstract_train_state(
  params: Params, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state: the orbax restore target."""
  fresh = functools.partial(_fresh_state, tx=tx, seed=0, ema=shardings.ema is not None)
  shapes = jax.eval_shape(fresh, params)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------
def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def step_key(state: TrainState) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def ema_decay_at(decay: float, n_updates: jax.Array) -> jax.Array:
  """The average's decay after ``n_updates`` optimizer updates: ``min(decay, (1 + n) /
  (10 + n))`` (TF's ``ExponentialMovingAverage(num_updates=n)``), so that in a short or
  fine-tuning run the average forgets the starting weights within tens of updates."""
  n = n_updates.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def _updates_done(opt_state: Any, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(did this micro-step apply an update, updates applied so far) after ``tx.update``.
  ``optax.MultiSteps`` applies one every ``grad_accum`` micro-steps and counts them."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.mini_step == 0, opt_state.gradient_step
  return jnp.array(True), step + 1


def update_average(
  ema: Params, params: Params, decay: float, applied: jax.Array, n_updates: jax.Array
) -> Params:
  """``ema <- d * ema + (1 - d) * params`` on a micro-step that applied an update."""
  d = ema_decay_at(decay, n_updates)
  new = optax.incremental_update(params, ema, 1.0 - d)
  return jax.tree.map(lambda n, o: jnp.where(applied, n, o).astype(o.dtype), new, ema)


def guarded_update(
  state: TrainState,
  loss: jax.Array,
  grads: Params,
  tx: optax.GradientTransformation,
  ema_decay: float = 0.0,
) -> tuple[TrainState, Metrics]:
  """The optimizer update every trainer (SFT and GRPO) takes, behind the NaN guard.

  A non-finite loss, gradient norm or new parameter leaves params, average and optimizer
  state unchanged and records the (micro-)step in ``nonfinite_step`` (sticky: later
  steps are skipped too). The average (``state.ema``, when there is one) moves toward
  the new params by ``ema_decay``. Returns the new state and ``loss / grad_norm /
  finite``.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    applied, n_updates = _updates_done(opt_state, state.step)
    ema = update_average(ema, params, ema_decay, applied, n_updates)
  ok = (
    jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params) & (state.nonfinite_step < 0)
  )
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
  bad = jnp.where((state.nonfinite_step < 0) & ~ok, state.step, state.nonfinite_step)
  new_state = TrainState(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    rng=state.rng,
    nonfinite_step=bad,
    ema=None if ema is None else keep(ema, state.ema),
  )
  return new_state, dict(loss=loss, grad_norm=grad_norm, finite=ok)


def train_step(
  graphdef: nnx.GraphDef,
  state: TrainState,
  frozen: nnx.State,
  batch: Batch,
  *,
  tx: optax.GradientTransformation,
  method: str,
  c: int,
  settings: Any,
  ema_decay: float = 0.0,
) -> tuple[TrainState, Metrics]:
  """One micro-step of any SFT method: the method's loss, then :func:`guarded_update`.

  ``c`` (the batch's compression factor) and ``method`` are static: one compile per
  (method, bucket shapes, c). ``settings`` is the method's static loss settings.
  """
  m = methods.get(method)
  key = step_key(state)

  def objective(params):
    model = merge_model(graphdef, params, frozen)
    return m.loss(model, batch, key, c=c, settings=settings)

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_state, info = guarded_update(state, loss, grads, tx, ema_decay)
  return new_state, dict(metrics, **info)


def eval_loss(
  graphdef: nnx.GraphDef,
  params: Params,
  frozen: nnx.State,
  batch: Batch,
  key: jax.Array,
  *,
  method: str,
  c: int,
  settings: Any,
) -> Metrics:
  """The training objective without gradients (validation loss)."""
  model = merge_model(graphdef, params, frozen)
  loss, metrics = methods.get(method).loss(model, batch, key, c=c, settings=settings)
  return dict(metrics, loss=loss)


def compile_steps(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  settings: Any,
  shardings: TrainState,
  ema_decay: float = 0.0,
) -> tuple[Callable[..., tuple[TrainState, Metrics]], Callable[..., Metrics]]:
  """Jitted (train_step, eval_loss): state donated and kept in ``shardings``.

  Call as ``step(state, frozen, batch, method=..., c=...)`` and
  ``evaluate(params, frozen, batch, key, method=..., c=...)``.
  """
  train = jax.jit(
    functools.partial(train_step, graphdef, tx=tx, settings=settings, ema_decay=ema_decay),
    static_argnames=("method", "c"),
    donate_argnums=(0,),
    out_shardings=(shardings, None),
  )
  evaluate = jax.jit(
    functools.partial(eval_loss, graphdef, settings=settings), static_argnames=("method", "c")
  )
  return train, evaluate


def put_batch(batch: dict[str, Any], mesh: Mesh, rules) -> Batch:
  """Host numpy batch (this process's rows) -> global arrays sharded over ``batch``."""
  out = {}
  for k, v in batch.items():
    sh = shd.batch_sharding(mesh, rules, ndim=v.ndim)
    out[k] = jax.make_array_from_process_local_data(sh, v)
  return out
