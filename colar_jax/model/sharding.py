"""One mesh from config, logical-axis rules, sharded model creation, multi-host start.

Parameters are annotated with logical names in ``model.py`` (``embed``,
``mlp``, ``q_heads`` ...). The config's ``sharding.rules`` map each logical
name to mesh axes; that is the only place a parallelism layout is decided, so
switching FSDP <-> tensor parallel is a config change, not a code change.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default logical -> mesh rules: weights FSDP-sharded on their d_model side and
# tensor-parallel on heads / MLP width; activations' batch over (data, fsdp).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("layers", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("mlp", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("latent_mlp", "tensor"),
)


def maybe_initialize_distributed(d: Any = None) -> None:
  """Calls ``jax.distributed.initialize`` when the config or environment asks.

  ``d`` is the ``config.Distributed`` section; ``d.initialize``: "auto" (initialise
  when a coordinator is configured or a TPU pod / SLURM environment is detected),
  "true", "false".
  """
  mode = str(d.initialize if d is not None else "auto").lower()
  env_hint = any(
    k in os.environ
    for k in (
      "JAX_COORDINATOR_ADDRESS",
      "SLURM_NTASKS",
      "TPU_WORKER_HOSTNAMES",
      "MEGASCALE_COORDINATOR_ADDRESS",
    )
  )
  coord = d.coordinator_address if d is not None else ""
  if mode == "false" or (mode == "auto" and not (coord or env_hint)):
    return
  if jax.distributed.is_initialized():
    return
  kw = {}
  if coord:
    kw = dict(
      coordinator_address=coord, num_processes=int(d.num_processes), process_id=int(d.process_id)
    )
  jax.distributed.initialize(**kw)
  logging.info(
    "jax.distributed: process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def resolve_mesh_shape(shape: dict[str, int], n_devices: int) -> tuple[int, ...]:
  """Fills one -1 axis with 'the rest'; checks the product equals the device count."""
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if n_devices % rest:
      raise ValueError(f"mesh: {n_devices} devices not divisible by fixed axes {rest}")
    sizes[sizes.index(-1)] = n_devices // rest
  if math.prod(sizes) != n_devices:
    raise ValueError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
      f"{n_devices} are visible ({jax.process_count()} processes x "
      f"{jax.local_device_count()} local). On a pod, start the same command on "
      "every host (launch/tpu_pod.sh does --worker=all)."
    )
  return tuple(sizes)


def make_mesh(mesh: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The single mesh of a run, from its ``config.Mesh`` section (or a dict of the axis
  sizes ``data / fsdp / tensor``; None = all devices on ``data``)."""
  devices = list(devices if devices is not None else jax.devices())
  if mesh is None:
    mesh_cfg = {"data": -1}
  elif isinstance(mesh, dict):
    mesh_cfg = dict(mesh)
  else:
    mesh_cfg = {a: getattr(mesh, a) for a in MESH_AXES}
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # fake CPU devices / unusual topologies: plain reshape
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(sharding: Any = None) -> tuple[tuple[str, Any], ...]:
  """The logical-axis -> mesh-axis rules of a ``config.Sharding`` section (empty or None:
  :data:`DEFAULT_RULES`)."""
  rules = getattr(sharding, "rules", None) if sharding is not None else None
  if not rules:
    return DEFAULT_RULES
  return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rules)


def logical_to_mesh(spec: Sequence[str | None], rules) -> P:
  """Maps a tuple of logical names to a PartitionSpec with the given rules."""
  table = dict(rules)
  return P(*(table.get(name) if name is not None else None for name in spec))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Batch dimension over the ``batch`` logical axis; the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules))


def state_shardings(state: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding tree for an nnx State whose Variables carry logical names."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, _dedupe(s)), specs, is_leaf=lambda x: isinstance(x, P)
  )


def _dedupe(spec: P) -> P:
  """A mesh axis may shard only one dimension: later repeats are replicated."""
  seen: set[str] = set()
  out = []
  for entry in spec:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    keep = tuple(n for n in names if n not in seen)
    seen.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*out)


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
  """Initialises ``ctor()`` directly into its sharding (no full host copy).

  ``nnx.eval_shape`` gives the abstract state; a jitted init with
  ``out_shardings`` then materialises each shard on its own device.
  """
  abstract = nnx.eval_shape(ctor)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)

  def init():
    return nnx.state(ctor())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules) -> nnx.Module:
  """Moves an existing (e.g. host-loaded) model onto the mesh per its logical names."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, state_shardings(state, mesh, rules))
  return nnx.merge(graphdef, state)


def check_process_layout(mesh: Mesh) -> None:
  """Fails fast on the classic 'ran on one host only' mistake."""
  n_mesh = mesh.devices.size
  if n_mesh != jax.device_count():
    raise RuntimeError(
      f"mesh has {n_mesh} devices but jax sees {jax.device_count()} "
      f"({jax.process_count()} processes); every host must run the same command"
    )
