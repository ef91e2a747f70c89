"""Setting a run up: its data, tokenizer, model and mesh; and loading a trained run.

Both trainers (``train.sft``, ``train.rl.loop``) start from :func:`setup`, which returns
a :class:`RunSetup`; evaluation and generation load a finished run with
:func:`load_run`. ``run`` is always the typed config (:class:`colar_jax.config.Run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from colar_jax import config as cfglib
from colar_jax import methods, paths
from colar_jax.data import builders, pipeline, prompts
from colar_jax.data.records import Record
from colar_jax.decode.rollout import RolloutConfig
from colar_jax.methods.base import EncodeContext, Method, MethodEncoder
from colar_jax.model import CoLaRModel, LatentHead, LatentProjection, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.train import state as ts
from colar_jax.train import workdir as workdir_lib
from colar_jax.weights import checkpoints, convert, export

# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
# The ``model`` keys that are numerics / adapters rather than architecture: the same
# names in ``config.Model`` and ``ModelConfig``.
NUMERICS = (
  "dtype",
  "param_dtype",
  "remat",
  "attention_impl",
  "lora_rank",
  "lora_alpha",
  "lora_targets",
  "latent_hidden_size",
  "latent_deterministic",
)


def model_config(run: cfglib.Run) -> ModelConfig:
  """The ModelConfig of a run: from ``model.hf_dir`` if set, else ``model.arch``; the
  latent projection's width from the method."""
  m = run.model
  numerics = {k: getattr(m, k) for k in NUMERICS}
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
  overrides = {k: getattr(mc, k) for k in NUMERICS}
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
      kind="run", path=paths.absolute(run.init_from), checkpoint=meta["checkpoint"]
    )
  if run.model.hf_dir:
    return _from_hf_dir(run, mesh, rules), dict(kind="hf", path=paths.absolute(run.model.hf_dir))
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
  built: dict[str, Any] = {}

  def read(step_dir: str) -> tuple[CoLaRModel, dict[str, Any]]:
    meta = checkpoints.read_step_meta(step_dir)
    key = json.dumps([meta["config"], meta.get("base")], sort_keys=True, default=str)
    if key not in built:  # the base of this step's config (one build unless it changed)
      # Its upstream run / converted weights where the run's pointers find them now.
      src_run, _ = relocated(run_of_meta(meta), meta, workdir_of(step_dir), always=True)
      base, _ = build_model(src_run, mesh, rules)
      lora = model_config(src_run).lora_rank > 0
      _, p_state, _ = nnx.split(base, ts.trainable_filter(lora), ...)
      p_shard = nnx.to_pure_dict(shd.state_shardings(p_state, mesh, rules))
      abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(p_state),
        p_shard,
      )
      built.clear()
      built[key] = (base, abstract)
    base, abstract = built[key]
    checkpoints.transplant(base, checkpoints.restore_params(step_dir, abstract), path)
    return base, meta

  # The newest step whose meta and params read (an older one with a warning).
  _, (base, meta) = checkpoints.readable(path, read)
  meta = dict(meta, newest=checkpoints.step_dirs(path)[0], tokenizer_dir=tokenizer_dir_of(meta))
  if target is None:
    return base, meta
  mc = model_config(target)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(int(target.seed))), mesh, rules)
  src = _untrained_heads_dropped(nnx.to_pure_dict(nnx.state(base)), model, meta.get("method"))
  checkpoints.transplant(model, src, path, complete=True)
  return model, meta


def _untrained_heads_dropped(src: dict[str, Any], model: CoLaRModel, method: str | None) -> dict:
  """``src`` without the latent modules its method never trained (a CoT run's latent
  head, CoLaR's projection) where the new model's differ in shape: they are init
  weights, so a CoLaR run from CoT may choose its own ``model.latent_hidden_size``.
  Where the shapes agree they are copied as before (the same seed gives the same init)."""
  try:
    mode = methods.get(method).latent_mode if method else None
  except (KeyError, ValueError):
    return src
  trained = {"sampled": ("latent_head",), "hidden": ("latent_proj",)}.get(mode, ())
  dst = nnx.to_pure_dict(nnx.state(model))
  out = dict(src)
  for name in ("latent_head", "latent_proj"):
    if name in trained or name not in src:
      continue
    shapes = jax.tree.map(np.shape, src[name])
    if name not in dst or shapes != jax.tree.map(np.shape, dst[name]):
      del out[name]
  return out


# ----------------------------------------------------------------------------
# Movable runs: pointers to the upstream run, the converted weights and the tokenizer
# ----------------------------------------------------------------------------
# A checkpoint's ``meta.base`` holds, beside the absolute ``path`` (and ``checkpoint``:
# the upstream step dir of ``init_from``), ``rel``: the same target relative to the
# run's workdir, and ``fingerprint`` (``paths.fingerprint``); ``meta.base.tokenizer``
# the same (no fingerprint) for the tokenizer dir. A moved or copied run finds its
# targets at ``rel`` (the run tree moved as a whole) or still at ``path`` (only the run
# moved). ``meta.tokenizer_dir`` and ``base.path`` keep their old meaning.
_POINTED = {
  "run": ("init_from", "the upstream run's checkpoint"),
  "hf": ("model.hf_dir", "the converted base weights"),
}


def workdir_of(step_dir: str) -> str:
  """The workdir of ``<workdir>/checkpoints/<step>``."""
  return paths.parent(paths.parent(step_dir))


def with_pointers(base: dict[str, Any], workdir: str, tokenizer_dir: str) -> dict[str, Any]:
  """``base`` (build_model's pointer) with the pointers that find its target and the
  tokenizer again after a move."""
  out = dict(base)
  if base["kind"] in _POINTED:
    target = base.get("checkpoint") or base["path"]
    out.update(paths.pointer(target, workdir), path=base["path"])
  # No fingerprint: a damaged tokenizer is named by its loader (a changed one shows).
  out["tokenizer"] = paths.pointer(tokenizer_dir, workdir, fingerprinted=False)
  return out


def locate(ptr: dict[str, Any], workdir: str, key: str, what: str, target: str) -> str:
  """Where ``ptr`` (see :func:`with_pointers`) finds ``target`` now: relative to the
  run first, then its old absolute place, each only with the recorded fingerprint. One
  ConfigError line naming the missing path and the key otherwise."""
  places = [target]
  if ptr.get("rel") is not None:
    places.insert(0, paths.resolve_relative(ptr["rel"], workdir))
  places = list(dict.fromkeys(places))
  want, other = ptr.get("fingerprint"), None
  for p in places:
    if paths.exists(p):
      if want is None or paths.fingerprint(p) == want:
        return p
      other = other or p
  if other is not None:
    raise cfglib.ConfigError(
      f"config.{key}: {what} of {workdir} at {other} is not the one it was trained with "
      f"(fingerprint {paths.fingerprint(other)}, recorded {want}); put the original back"
    )
  where = " nor ".join(places)
  raise cfglib.ConfigError(
    f"config.{key}: {what} of {workdir} is missing: not at {where}; copy it to "
    f"{places[0]} (the place the run records relative to itself)"
  )


def relocated(
  run: cfglib.Run, meta: dict[str, Any], workdir: str, *, always: bool
) -> tuple[cfglib.Run, list[str]]:
  """``run`` (a checkpoint's config) with ``init_from`` / ``model.hf_dir`` where the
  checkpoint's pointers find them now, and the keys that moved. ``always``: also when
  the configured path exists (loading rebuilds exactly the recorded upstream step);
  else (a resume) only a path that is gone is replaced. Runs saved before the pointers
  keep their config."""
  base = meta.get("base") or {}
  kind, moved = base.get("kind"), []
  if kind not in _POINTED or "fingerprint" not in base:
    return run, moved
  key, what = _POINTED[kind]
  current = run.init_from if kind == "run" else run.model.hf_dir
  if not always and current and paths.exists(current):
    return run, moved
  target = base.get("checkpoint") or base["path"]
  found = locate(base, workdir, key, what, target)
  if found != target:
    moved.append(key)
  if kind == "run":
    return dataclasses.replace(run, init_from=found), moved
  return dataclasses.replace(run, model=dataclasses.replace(run.model, hf_dir=found)), moved


def tokenizer_dir_of(meta: dict[str, Any]) -> str:
  """The tokenizer dir of a checkpoint's meta (with ``checkpoint``: its step dir), found
  through its pointer when the run has moved."""
  ptr = (meta.get("base") or {}).get("tokenizer")
  if not ptr or "checkpoint" not in meta:
    return meta["tokenizer_dir"]
  return locate(
    ptr, workdir_of(meta["checkpoint"]), "data.tokenizer", "the tokenizer", meta["tokenizer_dir"]
  )


def relocate(run: cfglib.Run, workdir: str) -> cfglib.Run:
  """A resume of a moved run: ``init_from`` / ``model.hf_dir`` / ``data.tokenizer`` that
  no longer exist are pointed at where the newest checkpoint's pointers find the same
  content (fingerprint checked), and the drift check is told they moved. A fresh
  workdir, or paths that exist: ``run`` unchanged."""
  if checkpoints.last_complete_step(workdir) is None:
    return run
  try:
    meta = checkpoints.read_meta(workdir)
  except (FileNotFoundError, checkpoints.RunFileError):  # resuming says what is wrong
    return run
  run, moved = relocated(run, meta, paths.absolute(workdir), always=False)
  tok = run.data.tokenizer
  if tok and not paths.exists(tok) and (meta.get("base") or {}).get("tokenizer"):
    run = dataclasses.replace(
      run, data=dataclasses.replace(run.data, tokenizer=tokenizer_dir_of(meta))
    )
    moved.append("data.tokenizer")
  for key in moved:
    logging.info("config.%s: the run's recorded content was found at its new place", key)
  workdir_lib.note_moved(workdir, moved)
  return run


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


def check_source(path: str, key: str) -> None:
  """A source folder (or file) exists and is not empty (one line naming it)."""
  if not paths.exists(path):
    raise cfglib.ConfigError(f"{key}: {path} does not exist")
  files = [path] if paths.is_file(path) else [f for _, f in paths.walk_files(path)]
  if not files:
    raise cfglib.ConfigError(f"{key}: {path} is an empty directory (no source files)")
  for f in files:
    if paths.path(f).stat().length == 0 and f.endswith((".json", ".jsonl", ".txt")):
      raise cfglib.ConfigError(f"{key}: source file {f} is empty")


def check_split(name: str, sizes: Any, split: str, key: str) -> None:
  if split not in sizes:
    raise cfglib.ConfigError(f"{key}: {name} has no split {split!r}; it has {sorted(sizes)}")


def prepare_data(name: str, data_dir: str, **kw: Any) -> builders.PrepareResult:
  """``builders.prepare``; an empty split (tfds asserts) is one line naming the source."""
  try:
    return builders.prepare(name, data_dir, **kw)
  except AssertionError as e:  # 'Failed to finalize writing of split "x": No examples ...'
    if "No examples were yielded" not in str(e):
      raise
    raise cfglib.ConfigError(
      f"config.data.source: {checkpoints.first_line(e)} (dataset {name}, source "
      f"{kw.get('source') or 'none'}: empty source files?)"
    ) from None


def check_inputs(run: cfglib.Run) -> None:
  """What a run's config points at, checked before any set-up work: the dataset and (for
  the synthetic task) its split, ``model.hf_dir``, ``data.tokenizer``, ``init_from`` and
  ``data.source``. Each failure is one ConfigError line naming the key."""
  if run.data.dataset not in builders.BUILDERS:
    raise cfglib.ConfigError(
      f"config.data.dataset: unknown dataset {run.data.dataset!r}; known: "
      f"{', '.join(sorted(builders.BUILDERS))}"
    )
  if run.data.dataset == "synthetic":  # its splits are known without preparing it
    check_split(
      "synthetic", ("train", "val", "test"), run.data.train_split, "config.data.train_split"
    )
  for key, path in (("model.hf_dir", run.model.hf_dir), ("data.tokenizer", run.data.tokenizer)):
    if path and not paths.is_dir(path):
      raise cfglib.ConfigError(f"config.{key}: {path} is not a directory")
  if run.model.hf_dir and not paths.is_file(paths.join(run.model.hf_dir, "config.json")):
    raise cfglib.ConfigError(
      f"config.model.hf_dir: {run.model.hf_dir} has no config.json (expected a directory "
      "written by `convert hf-to-orbax`)"
    )
  if run.init_from:
    try:
      checkpoints.step_dirs(run.init_from)
    except FileNotFoundError as e:
      raise cfglib.ConfigError(f"config.init_from: {e}") from None
  if run.data.source:
    check_source(run.data.source, "config.data.source")
  if run.data.tokenizer:
    check_tokenizer(run.data.tokenizer)


def data_dir_of(run: cfglib.Run, workdir: str) -> str:
  return run.data.data_dir or paths.join(paths.parent(workdir), "data")


def tokenizer_for(
  run: cfglib.Run, workdir: str, train_source: Any, templates: prompts.PromptTemplates
) -> tuple[Any, str]:
  """HF tokenizer (``data.tokenizer`` / ``model.hf_dir``), the ``init_from`` run's, or a
  char tokenizer trained once and kept in ``<workdir>/tokenizer``."""
  path = run.data.tokenizer or run.model.hf_dir
  if not path and run.init_from:
    path = tokenizer_dir_of(checkpoints.read_meta(run.init_from))
  if path:
    return (load_tokenizer(path, pad_as_eos=bool(run.model.hf_dir)), paths.absolute(path))
  out = paths.join(workdir, "tokenizer")
  if paths.exists(paths.join(out, "tokenizer.json")):
    return load_tokenizer(out), out
  recs = (Record.from_example(train_source[i]) for i in range(len(train_source)))
  if jax.process_index() == 0:
    with checkpoints.writing(os.path.join(out, "tokenizer.json")):
      prompts.train_char_tokenizer(prompts.char_tokenizer_corpus(recs), out, templates=templates)
  if jax.process_count() > 1:  # the other hosts read it once process 0 has written it
    multihost_utils.sync_global_devices("colar_jax: char tokenizer written")
  return load_tokenizer(out), out


def check_tokenizer(path: str) -> None:
  """The tokenizer dir exists and its ``tokenizer.json`` (if any) parses (one line)."""
  file = paths.join(path, "tokenizer.json")
  if not paths.is_dir(path):
    raise checkpoints.RunFileError(f"tokenizer dir {path} does not exist")
  try:
    json.loads(paths.read_text(file))
  except FileNotFoundError:
    pass  # a slow-tokenizer dir (vocab files only): transformers reads it
  except (OSError, ValueError) as e:
    raise checkpoints.RunFileError(
      f"tokenizer {file} is unreadable ({checkpoints.first_line(e)})"
    ) from None


def load_tokenizer(path: str, *, pad_as_eos: bool = False) -> Any:
  """``prompts.load_tokenizer``; a missing or damaged tokenizer is one line naming it."""
  check_tokenizer(path)
  try:
    return prompts.load_tokenizer(path, pad_as_eos=pad_as_eos)
  except (OSError, ValueError) as e:
    raise checkpoints.RunFileError(
      f"tokenizer {path}: cannot load it ({checkpoints.first_line(e)})"
    ) from None


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
  sizes = prepare_data(name, data_dir, source=run.data.source or None, config=bcfg).sizes
  check_split(name, sizes, run.data.train_split, "config.data.train_split")
  train_src = builders.load_source(name, data_dir, run.data.train_split, config=bcfg)
  if run.data.val_split in sizes:
    val_src = builders.load_source(name, data_dir, run.data.val_split, config=bcfg)
  else:  # datasets without a val split: validate on nothing
    logging.info("%s has no split %r: no validation", name, run.data.val_split)
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
  base = with_pointers(base, workdir, data.tokenizer_dir)
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
  """Restores model, tokenizer and config of the run in ``workdir`` (its latest step), or
  of an export of one (``weights.export``: a directory with ``colar.json``)."""
  if export.is_export(workdir):
    return load_export(workdir, mesh)
  # The newest readable step (an older one with a warning; read-only: nothing is moved).
  run = run_of_meta(checkpoints.read_meta(workdir))
  if mesh is None:  # all local devices, data parallel (the run's own mesh may not fit)
    mesh = shd.make_mesh()
  model, meta = load_model(workdir, mesh, shd.logical_rules(run.sharding))
  run = run_of_meta(meta)
  tok = load_tokenizer(meta["tokenizer_dir"], pad_as_eos=bool(run.model.hf_dir))
  if meta["checkpoint"] != meta["newest"]:
    logging.warning(
      "using %s (step %s), not the newest step %s (unreadable)",
      meta["checkpoint"],
      meta.get("step"),
      os.path.basename(meta["newest"]),
    )
  logging.info("loaded %s (step %s)", meta["checkpoint"], meta.get("step"))
  return LoadedRun(
    model=model, tokenizer=tok, run=run, embed_std=float(meta["embed_std"]), meta=meta
  )


def load_export(path: str, mesh: Mesh | None = None) -> LoadedRun:
  """A run exported by ``python -m colar_jax export``: the LM from its HF files (LoRA
  already merged), the latent head / projection from ``colar.safetensors``."""
  info, heads = export.read_parts(path)
  run = cfglib.from_config_dict(cfglib.upgrade_legacy(info["config"]))
  m = run.model
  mc = ModelConfig.from_hf_dir(
    path,
    dtype=m.dtype,
    param_dtype=info["param_dtype"],
    remat=m.remat,
    attention_impl=m.attention_impl,
    latent_hidden_size=m.latent_hidden_size,
    latent_deterministic=m.latent_deterministic,
    latent_proj_size=int(info["latent_proj_size"]),
  )
  mesh = mesh or shd.make_mesh()
  rules = shd.logical_rules(run.sharding)
  model = nnx.eval_shape(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)))
  model.lm = convert.load_hf_into_model(path, mc, mesh, rules)
  model.latent_head = shd.create_sharded(lambda: LatentHead(mc, rngs=nnx.Rngs(0)), mesh, rules)
  checkpoints.transplant(model.latent_head, heads["latent_head"], path, complete=True)
  if mc.latent_proj_size > 0:
    model.latent_proj = shd.create_sharded(
      lambda: LatentProjection(mc, rngs=nnx.Rngs(0)), mesh, rules
    )
    checkpoints.transplant(model.latent_proj, heads["latent_proj"], path, complete=True)
  tok = prompts.load_tokenizer(path, pad_as_eos=bool(info["pad_as_eos"]))
  meta = dict(
    checkpoint=paths.absolute(path),
    step=info.get("step"),
    tokenizer_dir=path,
    embed_std=info["embed_std"],
    export=info,
  )
  logging.info("loaded the export %s (run step %s)", path, info.get("step"))
  return LoadedRun(
    model=model, tokenizer=tok, run=run, embed_std=float(info["embed_std"]), meta=meta
  )


def is_converted_dir(path: str) -> bool:
  """A ``convert hf-to-orbax`` output (config.json + params/), not a run or an export."""
  return (
    paths.is_file(paths.join(path, "config.json"))
    and paths.is_dir(paths.join(path, convert.PARAMS_DIR))
    and not export.is_export(path)
  )


def load_converted(path: str, run: cfglib.Run, mesh: Mesh | None = None) -> LoadedRun:
  """The BASE model of a converted dir (no training run), for a token method's plain
  decoding (the zero-shot row): ``run``'s numerics, templates and rollout, no LoRA
  adapters, the dir's tokenizer and ``embed_std``. Latent methods need a trained latent
  head: a ConfigError says so."""
  if methods.get(run.method).latent_mode != "none":
    raise cfglib.ConfigError(
      f"config: {path} is a converted base model (no training run): it decodes with a "
      f"token method only (--method cot or nocot), not {run.method!r}, whose latent head "
      "would be untrained"
    )
  m = dataclasses.replace(run.model, hf_dir=os.path.abspath(path), lora_rank=0)
  run = dataclasses.replace(run, model=m, init_from="")
  mesh = mesh or shd.make_mesh()
  model = _from_hf_dir(run, mesh, shd.logical_rules(run.sharding))
  tok = load_tokenizer(path, pad_as_eos=True)
  std = resolve_embed_std(run, model)
  meta = dict(
    checkpoint=os.path.abspath(path),
    step=None,
    tokenizer_dir=os.path.abspath(path),
    embed_std=std,
    base=dict(kind="hf", path=os.path.abspath(path)),
  )
  logging.info("loaded the converted base model %s", path)
  return LoadedRun(model=model, tokenizer=tok, run=run, embed_std=std, meta=meta)


def setup_compile_cache(path: str) -> None:
  """Persistent compilation cache (re-compiles drop from seconds to ~1 s on CPU)."""
  if path:
    path = paths.absolute(path)
    try:
      paths.makedirs(path)
    except OSError as e:  # a read-only home: compile every time, but run
      logging.warning("no compilation cache: cannot create %s (%s)", path, e.strerror)
      return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
