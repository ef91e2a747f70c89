"""Run checkpoints (Orbax ``CheckpointManager``), model building and run loading.

Layout of ``<workdir>/checkpoints/<step>/``:

  params/  trainable parameters (pure dict). Full fine-tuning: the whole model.
           LoRA: only the adapters + latent head; ``meta.base`` points at the
           frozen base weights (random init seed, converted HF dir or an
           ``init_from`` run), which :func:`build_model` recreates exactly.
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

import dataclasses
import json
import logging
import os
import re
from typing import Any

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.sharding import Mesh
from orbax.checkpoint import checkpoint_managers as ocm

from colar_jax import configlib
from colar_jax import sharding as shd
from colar_jax.model import CoLaRModel, LatentHead, LatentProjection
from colar_jax.train_state import TrainState, trainable_filter

ITEMS = ("params", "train", "data", "meta")
CKPT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"


def monitor_mode(name: str) -> str:
  """Loss-like metrics are minimised, everything else (accuracy) maximised."""
  return "min" if "loss" in name else "max"


class Checkpointer:
  """Thin wrapper: one place that knows the item names and retention policy."""

  def __init__(self, directory: str, *, keep_last: int, keep_best: int, monitor: str,
               async_save: bool = True) -> None:
    self.directory = os.path.abspath(directory)
    self.monitor = monitor
    policies: list[Any] = [ocm.LatestN(n=max(1, int(keep_last)))]
    if int(keep_best) > 0:
      policies.append(ocm.BestN(get_metric_fn=lambda m: m[monitor],
                                reverse=monitor_mode(monitor) == "min", n=int(keep_best),
                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, *, data_state: dict[str, Any] | None,
           meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    train = dict(opt_state=state.opt_state, step=state.step, rng=state.rng,
                 nonfinite_step=state.nonfinite_step)
    if metrics is not None and self.monitor not in metrics:
      metrics = None
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state or {}), meta=ocp.args.JsonSave(meta)),
        metrics=metrics)

  def restore(self, step: int, abstract: TrainState
              ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(state, data iterator state, meta) of ``step`` in ``abstract``'s shardings."""
    train = dict(opt_state=abstract.opt_state, step=abstract.step, rng=abstract.rng,
                 nonfinite_step=abstract.nonfinite_step)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train=ocp.args.StandardRestore(train), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    t = out["train"]
    state = TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"],
                       rng=t["rng"], nonfinite_step=t["nonfinite_step"])
    return state, dict(out["data"] or {}), dict(out["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

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
    raise FileNotFoundError(f"{path}: no complete checkpoint (expected a workdir, its "
                            f"{CKPT_SUBDIR}/ dir or a step dir)")
  return root, max(steps)


def _reader(root: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(root, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True,
                                                                    create=False))


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
    return mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))["params"]
  finally:
    mgr.close()


def config_from_meta(meta: dict[str, Any]) -> mlc.ConfigDict:
  return mlc.ConfigDict(meta["config"])


# ----------------------------------------------------------------------------
# Building the model of a run
# ----------------------------------------------------------------------------
def _from_hf_dir(c: mlc.ConfigDict, mesh: Mesh, rules: Any) -> CoLaRModel:
  """Decoder from a converted dir (``convert.load_orbax_dir``) + a fresh latent head."""
  from colar_jax import convert

  mc = configlib.model_config(c)
  overrides = {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc)
               if f.name in ("dtype", "param_dtype", "remat", "attention_impl", "lora_rank",
                             "lora_alpha", "latent_hidden_size", "latent_deterministic")}
  _, decoder = convert.load_orbax_dir(c.model.hf_dir, mesh=mesh, rules=rules,
                                      seed=int(c.seed), **overrides)
  model = nnx.eval_shape(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)))
  model.lm = decoder
  model.latent_head = shd.create_sharded(lambda: LatentHead(mc, rngs=nnx.Rngs(int(c.seed))),
                                         mesh, rules)
  if mc.latent_proj_size > 0:  # Coconut (use_proj) / Distill projection, fresh
    model.latent_proj = shd.create_sharded(
        lambda: LatentProjection(mc, rngs=nnx.Rngs(int(c.seed))), mesh, rules)
  return model


def _transplant(model: CoLaRModel, params: dict[str, Any], what: str, *,
                complete: bool = False) -> None:
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
        raise ValueError(f"{what}: checkpoint has no parameter {'/'.join(map(str, p))} "
                         "that the model needs")
      continue
    if tuple(src[k].shape) != tuple(dst[p].shape):
      raise ValueError(f"{what}: {'/'.join(k)} has shape {tuple(src[k].shape)}, the model "
                       f"expects {tuple(dst[p].shape)}")
    out[p] = jax.device_put(src[k], dst[p].sharding).astype(dst[p].dtype)
    used.add(k)
  left = sorted("/".join(k) for k in set(src) - used)
  if left:
    raise ValueError(f"{what}: parameters the model has no place for: {', '.join(left[:5])}"
                     " (a LoRA run can only initialise a run with the same LoRA rank)")
  pure = nnx.to_pure_dict(state)
  flat = traverse_util.flatten_dict(pure)
  flat.update(out)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)


def build_model(c: mlc.ConfigDict, mesh: Mesh, rules: Any) -> tuple[CoLaRModel, dict[str, Any]]:
  """The initial model of run config ``c`` and the pointer that recreates it.

  Priority: ``init_from`` (a previous run: its own base, then its trained
  params) > ``model.hf_dir`` (converted weights) > random init from ``seed``.
  Deterministic, so a LoRA checkpoint only needs this pointer for its base.
  """
  if c.init_from:
    model, meta = load_model(c.init_from, mesh, rules, target=c)
    return model, dict(kind="run", path=os.path.abspath(c.init_from),
                       checkpoint=meta["checkpoint"])
  if c.model.hf_dir:
    return _from_hf_dir(c, mesh, rules), dict(kind="hf", path=os.path.abspath(c.model.hf_dir))
  mc = configlib.model_config(c)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(int(c.seed))), mesh, rules)
  return model, dict(kind="random", seed=int(c.seed))


def load_model(path: str, mesh: Mesh, rules: Any, *, target: mlc.ConfigDict | None = None
               ) -> tuple[CoLaRModel, dict[str, Any]]:
  """The trained model of a checkpoint (workdir / manager dir / step dir).

  The run's base is rebuilt from its own config, its trained params restored
  on top. With ``target`` (another run's config, for ``init_from``) the
  weights are copied into a model built for ``target`` instead (same
  architecture; LoRA adapters of ``target`` start fresh when the source run
  had none).
  """
  meta = read_meta(path)
  run_cfg = config_from_meta(meta)
  base, _ = build_model(run_cfg, mesh, rules)
  lora = configlib.model_config(run_cfg).lora_rank > 0
  _, p_state, _ = nnx.split(base, trainable_filter(lora), ...)
  p_shard = nnx.to_pure_dict(shd.state_shardings(p_state, mesh, rules))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(p_state), p_shard)
  _transplant(base, restore_params(meta["checkpoint"], abstract), path)
  if target is None:
    return base, meta
  mc = configlib.model_config(target)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(int(target.seed))),
                             mesh, rules)
  _transplant(model, nnx.to_pure_dict(nnx.state(base)), path, complete=True)
  return model, meta


def load_run(workdir: str, mesh: Mesh | None = None):
  """``evaluate.Run`` (model, tokenizer, config, embed_std) of a trained run."""
  from colar_jax.data import prompts
  from colar_jax.evaluate import Run

  meta = read_meta(workdir)
  cfg = config_from_meta(meta)
  if mesh is None:  # all local devices, data parallel (the run's own mesh may not fit)
    mesh = shd.make_mesh(mlc.ConfigDict({"mesh": {"data": -1}}))
  model, _ = load_model(workdir, mesh, shd.logical_rules(cfg))
  tok = prompts.load_tokenizer(meta["tokenizer_dir"], pad_as_eos=bool(cfg.model.hf_dir))
  logging.info("loaded %s (step %s)", meta["checkpoint"], meta.get("step"))
  return Run(model=model, tokenizer=tok, config=cfg, embed_std=float(meta["embed_std"]))


def save_run_config(c: mlc.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    configlib.save_config(c, os.path.join(workdir, CONFIG_FILE))


def config_to_dict(c: mlc.ConfigDict) -> dict[str, Any]:
  return json.loads(c.to_json_best_effort())
