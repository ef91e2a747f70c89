"""Run checkpoints (Orbax ``CheckpointManager``): saving, locating, reading, transplanting.

Layout of ``<workdir>/checkpoints/<step>/``:

  params/  trainable parameters (pure dict). Full fine-tuning: the whole model.
           LoRA: only the adapters + latent head; ``meta.base`` points at the
           frozen base weights (random init seed, converted HF dir or an
           ``init_from`` run), which ``train.run.build_model`` recreates exactly.
  train/   optimizer state, micro-step, base RNG key, NaN-guard step.
  data/    the grain iterator state (JSON), so a resumed run sees the same batches.
  meta/    JSON: config, embed_std, base pointer, tokenizer dir, trainable set.

Orbax writes each step into a temporary directory and renames it when
complete, so a run SIGKILLed mid-save resumes from the last COMPLETE step
(stale temporaries are removed on restart). Saves are async: the device ->
host copy happens in ``save`` (so the next step may donate the state) and the
file writes overlap training. Retention: the last ``keep_last`` steps plus the
best ``keep_best`` by the monitored metric.

Separate ``params`` and ``train`` items let evaluation and ``init_from`` read
the weights without knowing the optimizer.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from orbax.checkpoint import checkpoint_managers as ocm

ITEMS = ("params", "train", "data", "meta")
CKPT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"


def monitor_mode(name: str) -> str:
  """Loss-like metrics are minimised, everything else (accuracy) maximised."""
  return "min" if "loss" in name else "max"


class Checkpointer:
  """Thin wrapper: one place that knows the item names and retention policy."""

  def __init__(
    self, directory: str, *, keep_last: int, keep_best: int, monitor: str, async_save: bool = True
  ) -> None:
    self.directory = os.path.abspath(directory)
    self.monitor = monitor
    policies: list[Any] = [ocm.LatestN(n=max(1, int(keep_last)))]
    if int(keep_best) > 0:
      policies.append(
        ocm.BestN(
          get_metric_fn=lambda m: m[monitor],
          reverse=monitor_mode(monitor) == "min",
          n=int(keep_best),
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self,
    step: int,
    *,
    params: Any,
    train: dict[str, Any],
    data_state: dict[str, Any] | None,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
  ) -> None:
    """``params``: the trainable parameters; ``train``: the rest of the train state
    (optimizer, counters, RNG) as a dict of arrays."""
    if metrics is not None and self.monitor not in metrics:
      metrics = None
    self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
      ),
      metrics=metrics,
    )

  def restore(
    self, step: int, abstract_params: Any, abstract_train: dict[str, Any]
  ) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(params, train dict, data iterator state, meta) of ``step``, in the abstract
    trees' shapes and shardings."""
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train=ocp.args.StandardRestore(abstract_train),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return out["params"], dict(out["train"]), dict(out["data"] or {}), dict(out["meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------
# Locating and reading checkpoints
# ----------------------------------------------------------------------------
def resolve(path: str) -> tuple[str, int]:
  """(manager dir, step) of a workdir, a ``checkpoints/`` dir or one step dir.

  A workdir / manager dir resolves to its latest complete step.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "meta")) and re.fullmatch(r"\d+", os.path.basename(path)):
    return os.path.dirname(path), int(os.path.basename(path))
  root = path
  if os.path.isdir(os.path.join(path, CKPT_SUBDIR)):
    root = os.path.join(path, CKPT_SUBDIR)
  steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
  steps = [s for s in steps if os.path.isdir(os.path.join(root, str(s), "meta"))]
  if not steps:
    raise FileNotFoundError(
      f"{path}: no complete checkpoint (expected a workdir, its {CKPT_SUBDIR}/ dir or a step dir)"
    )
  return root, max(steps)


def _reader(root: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )


def read_meta(path: str) -> dict[str, Any]:
  root, step = resolve(path)
  mgr = _reader(root)
  try:
    meta = dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  finally:
    mgr.close()
  meta["checkpoint"] = os.path.join(root, str(step))
  return meta


def restore_params(path: str, abstract_params: Any) -> Any:
  """Trainable params of a checkpoint into ``abstract_params`` (shapes + shardings)."""
  root, step = resolve(path)
  mgr = _reader(root)
  try:
    return mgr.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )["params"]
  finally:
    mgr.close()


def transplant(
  model: nnx.Module, params: dict[str, Any], what: str, *, complete: bool = False
) -> None:
  """Copies ``params`` (pure dict) into ``model`` by path; a plain ``.../kernel`` may
  fill a LoRA ``.../base/kernel`` (full-FT run -> LoRA run). Fails on leftovers."""
  src = traverse_util.flatten_dict(params)
  state = nnx.state(model)
  dst = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  used, out = set(), {}
  for p in dst:
    alias = tuple(x for i, x in enumerate(p) if not (x == "base" and i == len(p) - 2))
    k = p if p in src else alias if alias in src else None
    if k is None:
      if not complete:  # restoring a run's trainable subset onto its rebuilt base
        continue
      # ``complete``: the source is a whole model (init_from). Only modules a new
      # run adds may start fresh: the latent head / projection and LoRA adapters.
      # Anything else missing is a mismatched checkpoint (the reference's
      # strict=False silently kept random weights here).
      if not (p[0] in ("latent_head", "latent_proj") or p[-1] in ("lora_a", "lora_b")):
        raise ValueError(
          f"{what}: checkpoint has no parameter {'/'.join(map(str, p))} that the model needs"
        )
      continue
    if tuple(src[k].shape) != tuple(dst[p].shape):
      raise ValueError(
        f"{what}: {'/'.join(k)} has shape {tuple(src[k].shape)}, the model "
        f"expects {tuple(dst[p].shape)}"
      )
    out[p] = jax.device_put(src[k], dst[p].sharding).astype(dst[p].dtype)
    used.add(k)
  left = sorted("/".join(k) for k in set(src) - used)
  if left:
    raise ValueError(
      f"{what}: parameters the model has no place for: {', '.join(left[:5])}"
      " (a LoRA run can only initialise a run with the same LoRA rank)"
    )
  pure = nnx.to_pure_dict(state)
  flat = traverse_util.flatten_dict(pure)
  flat.update(out)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
