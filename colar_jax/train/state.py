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

NaN guard: a step whose loss, gradient norm or new parameters are not finite
leaves params and optimizer state unchanged and records its step in
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
  tx: optax.GradientTransformation, params: Params, p_shard: Any, mesh: Mesh
) -> TrainState:
  """Optimizer moments follow their parameter; counters and RNG are replicated."""
  rep = NamedSharding(mesh, P())
  abs_opt = jax.eval_shape(tx.init, params)
  opt_shard = optax.tree_map_params(
    tx, lambda _, s: s, abs_opt, p_shard, transform_non_params=lambda _: rep
  )
  return TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep, nonfinite_step=rep)


def _fresh_state(params: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
    nonfinite_step=jnp.full((), -1, jnp.int32),
  )


def init_train_state(
  params: Params, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
  """A fresh state placed per ``shardings`` (params are copied, not aliased)."""
  return jax.jit(functools.partial(_fresh_state, tx=tx, seed=seed), out_shardings=shardings)(params)


def abstract_train_state(
  params: Params, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state: the orbax restore target."""
  shapes = jax.eval_shape(functools.partial(_fresh_state, tx=tx, seed=0), params)
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


def guarded_update(
  state: TrainState, loss: jax.Array, grads: Params, tx: optax.GradientTransformation
) -> tuple[TrainState, Metrics]:
  """The optimizer update every trainer (SFT and GRPO) takes, behind the NaN guard.

  A non-finite loss, gradient norm or new parameter leaves params and optimizer state
  unchanged and records the (micro-)step in ``nonfinite_step`` (sticky: later steps are
  skipped too). Returns the new state and ``loss / grad_norm / finite``.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
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
  new_state, info = guarded_update(state, loss, grads, tx)
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
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, settings: Any, shardings: TrainState
) -> tuple[Callable[..., tuple[TrainState, Metrics]], Callable[..., Metrics]]:
  """Jitted (train_step, eval_loss): state donated and kept in ``shardings``.

  Call as ``step(state, frozen, batch, method=..., c=...)`` and
  ``evaluate(params, frozen, batch, key, method=..., c=...)``.
  """
  train = jax.jit(
    functools.partial(train_step, graphdef, tx=tx, settings=settings),
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
