"""Setting a run up: its data, tokenizer, model and mesh; and loading a trained run.

Both trainers (``train.sft``, ``train.rl.loop``) start from :func:`setup`, which returns
a :class:`RunSetup`; evaluation and generation load a finished run with
:func:`load_run`. ``run`` is always the typed config (:class:`colar_jax.config.Run`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from colar_jax import config as cfglib
from colar_jax import methods
from colar_jax.data import builders, pipeline, prompts
from colar_jax.data.records import Record
from colar_jax.decode.rollout import RolloutConfig
from colar_jax.methods.base import EncodeContext, Method, MethodEncoder
from colar_jax.model import CoLaRModel, LatentHead, LatentProjection, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.train import state as ts
from colar_jax.weights import checkpoints, convert


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
def model_config(run: cfglib.Run) -> ModelConfig:
  """The ModelConfig of a run: from ``model.hf_dir`` if set, else ``model.arch``; the
  latent projection's width from the method."""
  m = run.model
  numerics = dict(
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    remat=m.remat,
    attention_impl=m.attention_impl,
    lora_rank=m.lora_rank,
    lora_alpha=m.lora_alpha,
    latent_hidden_size=m.latent_hidden_size,
    latent_deterministic=m.latent_deterministic,
  )
  if m.hf_dir:
    cfg = ModelConfig.from_hf_dir(m.hf_dir, **numerics)
  else:
    arch = dataclasses.asdict(m.arch)
    arch["rope_scaling"] = tuple(tuple(x) for x in arch["rope_scaling"]) or None
    cfg = ModelConfig(**arch, **numerics)
  proj = methods.get(run.method).projection_size(run, cfg.hidden_size)
  return cfg.replace(latent_proj_size=proj)


def _from_hf_dir(run: cfglib.Run, mesh: Mesh, rules: Any) -> CoLaRModel:
  """Decoder from a converted dir (``convert.load_orbax_dir``) + a fresh latent head."""
  mc = model_config(run)
  overrides = {
    k: getattr(mc, k)
    for k in (
      "dtype",
      "param_dtype",
      "remat",
      "attention_impl",
      "lora_rank",
      "lora_alpha",
      "latent_hidden_size",
      "latent_deterministic",
    )
  }
  _, decoder = convert.load_orbax_dir(
    run.model.hf_dir, mesh=mesh, rules=rules, seed=int(run.seed), **overrides
  )
  model = nnx.eval_shape(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)))
  model.lm = decoder
  model.latent_head = shd.create_sharded(
    lambda: LatentHead(mc, rngs=nnx.Rngs(int(run.seed))), mesh, rules
  )
  if mc.latent_proj_size > 0:  # Coconut (use_proj) / Distill projection, fresh
    model.latent_proj = shd.create_sharded(
      lambda: LatentProjection(mc, rngs=nnx.Rngs(int(run.seed))), mesh, rules
    )
  return model


def build_model(run: cfglib.Run, mesh: Mesh, rules: Any) -> tuple[CoLaRModel, dict[str, Any]]:
  """The initial model of ``run`` and the pointer that recreates it.

  Priority: ``init_from`` (a previous run: its own base, then its trained params) >
  ``model.hf_dir`` (converted weights) > random init from ``seed``. Deterministic, so a
  LoRA checkpoint only needs this pointer for its base.
  """
  if run.init_from:
    model, meta = load_model(run.init_from, mesh, rules, target=run)
    return model, dict(
      kind="run", path=os.path.abspath(run.init_from), checkpoint=meta["checkpoint"]
    )
  if run.model.hf_dir:
    return _from_hf_dir(run, mesh, rules), dict(kind="hf", path=os.path.abspath(run.model.hf_dir))
  mc = model_config(run)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(int(run.seed))), mesh, rules)
  return model, dict(kind="random", seed=int(run.seed))


def run_of_meta(meta: dict[str, Any]) -> cfglib.Run:
  """The typed config saved in a checkpoint's meta (older configs upgraded)."""
  return cfglib.from_config_dict(cfglib.upgrade_legacy(meta["config"]))


def load_model(
  path: str, mesh: Mesh, rules: Any, *, target: cfglib.Run | None = None
) -> tuple[CoLaRModel, dict[str, Any]]:
  """The trained model of a checkpoint (workdir / manager dir / step dir).

  The run's base is rebuilt from its own config, its trained params restored on top.
  With ``target`` (another run's config, for ``init_from``) the weights are copied into
  a model built for ``target`` instead (same architecture; LoRA adapters of ``target``
  start fresh when the source run had none).
  """
  meta = checkpoints.read_meta(path)
  src_run = run_of_meta(meta)
  base, _ = build_model(src_run, mesh, rules)
  lora = model_config(src_run).lora_rank > 0
  _, p_state, _ = nnx.split(base, ts.trainable_filter(lora), ...)
  p_shard = nnx.to_pure_dict(shd.state_shardings(p_state, mesh, rules))
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nnx.to_pure_dict(p_state),
    p_shard,
  )
  checkpoints.transplant(base, checkpoints.restore_params(meta["checkpoint"], abstract), path)
  if target is None:
    return base, meta
  mc = model_config(target)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(int(target.seed))), mesh, rules)
  checkpoints.transplant(model, nnx.to_pure_dict(nnx.state(base)), path, complete=True)
  return model, meta


def resolve_embed_std(run: cfglib.Run, model: Any) -> float:
  """The latent scale of a run: config override > the ``init_from`` run's value (so
  CoT -> CoLaR -> RL share one constant, like the reference's per-model table) > the
  converted dir's ``embed_std.json`` > measured from the embedding matrix."""
  if float(run.model.embed_std) >= 0:
    return float(run.model.embed_std)
  if run.init_from:
    return float(checkpoints.read_meta(run.init_from)["embed_std"])
  if run.model.hf_dir:
    std = convert.read_embed_std(run.model.hf_dir)
    if std is not None:
      return std
  return convert.compute_embed_std(model.lm)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
  """The data side of a run: tokenizer, templates, the training pipeline, val split."""

  tokenizer: Any
  tokenizer_dir: str
  templates: prompts.PromptTemplates
  buckets: prompts.Buckets
  method: Method
  encoder: MethodEncoder  # the pipeline's encode_fn (its .stage(epoch) is the curriculum)
  train: Any  # TrainPipeline
  train_source: Any  # random-access train split (RL reads questions from it)
  val_source: Any  # random-access val split ([] when the dataset has none)
  factors: tuple[int, ...]

  def val_records(self, n: int) -> list[Record]:
    return [
      r if isinstance(r, Record) else Record.from_example(r)
      for r in (self.val_source[i] for i in range(min(n, len(self.val_source))))
    ]


def data_dir_of(run: cfglib.Run, workdir: str) -> str:
  return run.data.data_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data")


def tokenizer_for(
  run: cfglib.Run, workdir: str, train_source: Any, templates: prompts.PromptTemplates
) -> tuple[Any, str]:
  """HF tokenizer (``data.tokenizer`` / ``model.hf_dir``), the ``init_from`` run's, or a
  char tokenizer trained once and kept in ``<workdir>/tokenizer``."""
  path = run.data.tokenizer or run.model.hf_dir
  if not path and run.init_from:
    path = checkpoints.read_meta(run.init_from)["tokenizer_dir"]
  if path:
    return (prompts.load_tokenizer(path, pad_as_eos=bool(run.model.hf_dir)), os.path.abspath(path))
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return prompts.load_tokenizer(out), out
  recs = (Record.from_example(train_source[i]) for i in range(len(train_source)))
  if jax.process_index() == 0:
    prompts.train_char_tokenizer(prompts.char_tokenizer_corpus(recs), out, templates=templates)
  return prompts.load_tokenizer(out), out


def setup_data(
  run: cfglib.Run, workdir: str, *, batch_size: int | None = None, encoder: Any = None
) -> Data:
  """Prepares the dataset once and builds the seeded, resumable training pipeline.

  ``batch_size`` (global; default ``data.batch_size``) and ``encoder`` (default the
  method's) let GRPO batch prompts instead of SFT examples.
  """
  method = methods.get(run.method)
  templates, buckets = prompts.PromptTemplates.of(run.data), prompts.Buckets.of(run.data)
  data_dir = data_dir_of(run, workdir)
  name, bcfg = run.data.dataset, builders.builder_config(run.data)
  builders.prepare(name, data_dir, source=run.data.source or None, config=bcfg)
  train_src = builders.load_source(name, data_dir, run.data.train_split, config=bcfg)
  try:
    val_src = builders.load_source(name, data_dir, run.data.val_split, config=bcfg)
  except Exception:  # datasets without a val split: validate on nothing
    val_src = []
  tok, tok_dir = tokenizer_for(run, workdir, train_src, templates)
  n_proc = jax.process_count()
  ctx = EncodeContext(tok, templates, buckets, fixed_shapes=n_proc > 1)
  enc = MethodEncoder(method, run, ctx)
  factors = method.train_factors(run)
  global_batch = int(batch_size or run.data.batch_size)
  if global_batch % n_proc:
    raise cfglib.ConfigError(
      f"config: batch size {global_batch} is not divisible by {n_proc} processes"
    )
  sampler = pipeline.SpeedSampler(
    factors=factors,
    auto_prob=method.auto_prob(run),
    seed=int(run.seed),
    weights=method.factor_weights(run),
  )
  train = pipeline.make_train_pipeline(
    train_src,
    batch_size=global_batch // n_proc,
    encode_fn=encoder or enc,
    seed=int(run.seed),
    speed_sampler=sampler,
    shard_index=jax.process_index(),
    shard_count=n_proc,
  )
  return Data(tok, tok_dir, templates, buckets, method, enc, train, train_src, val_src, factors)


# ----------------------------------------------------------------------------
# The whole set-up
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class RunSetup:
  """What a trainer starts from (the model already split for the jitted steps)."""

  run: cfglib.Run  # with the tiny preset's vocab set from the char tokenizer
  mesh: Mesh
  rules: Any
  data: Data
  model: CoLaRModel
  base: dict[str, Any]  # the pointer that rebuilds the frozen base (checkpoint meta)
  graphdef: nnx.GraphDef
  params: ts.Params  # trainable parameters (pure dict)
  frozen: nnx.State
  param_shardings: Any


def with_vocab(run: cfglib.Run, vocab_size: int) -> cfglib.Run:
  arch = dataclasses.replace(run.model.arch, vocab_size=int(vocab_size))
  return dataclasses.replace(run, model=dataclasses.replace(run.model, arch=arch))


def check_batch_axes(mesh: Mesh, **sizes: int) -> None:
  """Each global batch size must split over the mesh's batch axes (data x fsdp)."""
  n_batch = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  for name, v in sizes.items():
    if int(v) % n_batch:
      raise cfglib.ConfigError(
        f"config.{name}={v} must be divisible by the mesh batch axes (data x fsdp = {n_batch})"
      )


def setup(run: cfglib.Run, workdir: str, **data_kw: Any) -> RunSetup:
  mesh, rules = shd.make_mesh(run.mesh), shd.logical_rules(run.sharding)
  shd.check_process_layout(mesh)
  data = setup_data(run, workdir, **data_kw)
  if not run.model.hf_dir:
    run = with_vocab(run, len(data.tokenizer))  # the char tokenizer's vocab
  check_batch_axes(
    mesh,
    **{"data.batch_size": run.data.batch_size, "data.eval_batch_size": run.data.eval_batch_size},
  )
  model, base = build_model(run, mesh, rules)
  lora = model_config(run).lora_rank > 0
  graphdef, p_state, frozen = nnx.split(model, ts.trainable_filter(lora), ...)
  p_shard = ts.param_shardings(p_state, mesh, rules)
  return RunSetup(
    run, mesh, rules, data, model, base, graphdef, nnx.to_pure_dict(p_state), frozen, p_shard
  )


# ----------------------------------------------------------------------------
# A trained run, for evaluation and generation
# ----------------------------------------------------------------------------
def rollout_config(
  rollout: cfglib.Rollout,
  tokenizer: Any,
  templates: prompts.PromptTemplates,
  embed_std: float,
  **overrides: Any,
) -> RolloutConfig:
  """The ``rollout`` section plus the tokenizer's separator / EOS / pad ids."""
  eos = tokenizer.eos_token_id
  kw = dict(
    dataclasses.asdict(rollout),
    separator_id=prompts.separator_id(tokenizer, templates),
    eos_id=-1 if eos is None else int(eos),
    pad_id=int(tokenizer.pad_token_id),
    embed_std=float(embed_std),
  )
  kw.update(overrides)
  return RolloutConfig(**kw)


@dataclasses.dataclass
class LoadedRun:
  """What evaluation / generation need from a training run."""

  model: Any
  tokenizer: Any
  run: cfglib.Run
  embed_std: float
  meta: dict[str, Any]

  @property
  def method(self) -> str:
    return str(self.run.method)

  @property
  def templates(self) -> prompts.PromptTemplates:
    return prompts.PromptTemplates.of(self.run.data)

  @property
  def buckets(self) -> prompts.Buckets:
    return prompts.Buckets.of(self.run.data)

  def rollout_config(
    self, rollout: cfglib.Rollout | None = None, **overrides: Any
  ) -> RolloutConfig:
    """The run's (or the given) ``rollout`` settings plus its tokenizer's ids."""
    return rollout_config(
      rollout or self.run.rollout, self.tokenizer, self.templates, self.embed_std, **overrides
    )


def load_run(workdir: str, mesh: Mesh | None = None) -> LoadedRun:
  """Restores model, tokenizer and config of the run in ``workdir`` (its latest step)."""
  meta = checkpoints.read_meta(workdir)
  run = run_of_meta(meta)
  if mesh is None:  # all local devices, data parallel (the run's own mesh may not fit)
    mesh = shd.make_mesh()
  model, _ = load_model(workdir, mesh, shd.logical_rules(run.sharding))
  tok = prompts.load_tokenizer(meta["tokenizer_dir"], pad_as_eos=bool(run.model.hf_dir))
  logging.info("loaded %s (step %s)", meta["checkpoint"], meta.get("step"))
  return LoadedRun(
    model=model, tokenizer=tok, run=run, embed_std=float(meta["embed_std"]), meta=meta
  )


def setup_compile_cache(path: str) -> None:
  """Persistent compilation cache (re-compiles drop from seconds to ~1 s on CPU)."""
  if path:
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
