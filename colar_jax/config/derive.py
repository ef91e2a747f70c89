"""Everything derived from the schema: ConfigDicts, validation, overrides, config files,
saved (and legacy) run configs, and ``config show``."""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections as mlc
from ml_collections import config_dict as mlc_cd

from colar_jax import paths
from colar_jax.config.schema import (
  LORA_PROJECTIONS,
  MODEL_PRESETS,
  ConfigError,
  Run,
  _check,
  _fail,
)

# ----------------------------------------------------------------------------
# Schema introspection.


@functools.cache
def _hints(cls) -> dict[str, Any]:
  """Field name -> resolved type, in declaration order."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp):
  """``X | None`` -> X; anything else -> None."""
  if typing.get_origin(tp) in (types.UnionType, typing.Union):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0]
  return None


def _type_name(tp) -> str:
  return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


@functools.cache
def _all_keys(cls=Run, prefix: str = "") -> tuple[str, ...]:
  """Every dotted key of the schema, sections included."""
  out = []
  for name, tp in _hints(cls).items():
    out.append(prefix + name)
    if _is_section(tp):
      out.extend(_all_keys(tp, prefix + name + "."))
  return tuple(out)


def _no_such_key(prefix: str, seg: str, rest: Sequence[str], cls) -> ConfigError:
  """The error for an unknown ``prefix + seg [+ rest]``, naming the nearest key."""
  full = ".".join([prefix + seg, *rest])
  keys = list(_hints(cls))
  guess = None
  close = difflib.get_close_matches(seg, keys, n=1)
  if close and ".".join([prefix + close[0], *rest]) in _all_keys():
    guess = ".".join([prefix + close[0], *rest])
  if guess is None:  # fall back to the whole dotted key (e.g. a wrong section)
    near = difflib.get_close_matches(full, _all_keys(), n=1)
    guess = near[0] if near else (prefix + close[0] if close else None)
  if guess:
    return ConfigError(f"config.{full}: no such key; did you mean {guess}?")
  where = f" in {prefix[:-1]}" if prefix else ""
  return ConfigError(f"config.{full}: no such key; known keys{where}: {', '.join(keys)}")


def _resolve(key: str):
  """Dotted key -> its leaf type, or a ConfigError."""
  parts, cls, prefix = key.split("."), Run, ""
  for i, seg in enumerate(parts):
    hints = _hints(cls)
    if seg not in hints:
      raise _no_such_key(prefix, seg, parts[i + 1 :], cls)
    tp = hints[seg]
    if i == len(parts) - 1:
      if _is_section(tp):
        example = next(iter(_hints(tp)))
        _fail(key, f"is a section, not a key; set one of its keys, e.g. {key}.{example}=...")
      return tp
    if not _is_section(tp):
      raise _no_such_key(prefix, seg, parts[i + 1 :], cls)
    cls, prefix = tp, prefix + seg + "."
  raise AssertionError(key)


# ----------------------------------------------------------------------------
# Conversion between ConfigDict / dict and the typed Run.


class _Mismatch(Exception):
  pass


def _tuplify(v):
  return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _coerce(value, tp):
  """``value`` as type ``tp`` (lists -> tuples, int -> float), or _Mismatch."""
  if tp is Any:
    return _tuplify(value)
  inner = _optional_inner(tp)
  if inner is not None:
    return None if value is None else _coerce(value, inner)
  if typing.get_origin(tp) is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (tuple, list)):
      raise _Mismatch()
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0]) for v in value)
    if len(value) != len(args):
      raise _Mismatch()
    return tuple(_coerce(v, a) for v, a in zip(value, args))
  if tp is bool and isinstance(value, bool):
    return value
  if tp in (int, float) and isinstance(value, int) and not isinstance(value, bool):
    return tp(value)
  if tp is float and isinstance(value, float):
    return value
  if tp is str and isinstance(value, str):
    return value
  raise _Mismatch()


def _convert(value, tp, key: str):
  try:
    return _coerce(value, tp)
  except _Mismatch:
    _fail(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _first_leaf(v) -> list[str]:
  """Path to the first leaf inside a mapping (to name an unknown key fully)."""
  if isinstance(v, Mapping) and v:
    k = next(iter(v))
    return [str(k), *_first_leaf(v[k])]
  return []


def _build(cls, d, prefix: str):
  if isinstance(d, mlc.ConfigDict):
    d = d.to_dict()
  if not isinstance(d, Mapping):
    _fail(prefix[:-1], f"expected a section (mapping), got {d!r}")
  hints = _hints(cls)
  for k in d:
    if k not in hints:
      raise _no_such_key(prefix, str(k), _first_leaf(d[k]), cls)
  kwargs = {}
  for name, tp in hints.items():
    if name in d:
      kwargs[name] = (
        _build(tp, d[name], prefix + name + ".")
        if _is_section(tp)
        else _convert(d[name], tp, prefix + name)
      )
  return cls(**kwargs)


def from_config_dict(c: mlc.ConfigDict | Mapping[str, Any]) -> Run:
  """The typed, validated ``Run`` of a ConfigDict or nested dict."""
  return validate(_build(Run, c, ""))


def to_dict(run: Run) -> dict[str, Any]:
  """``run`` as a nested dict (tuples stay tuples)."""
  return dataclasses.asdict(run)


def to_config_dict(run: Run) -> mlc.ConfigDict:
  """``run`` (or any section) as an unlocked ConfigDict."""
  c = mlc.ConfigDict()
  for name, tp in _hints(type(run)).items():
    v = getattr(run, name)
    if _is_section(tp):
      c[name] = to_config_dict(v)
    elif v is None and _optional_inner(tp) is not None:
      # A typed placeholder: a bare None would refuse a later str override.
      c[name] = mlc_cd.placeholder(_optional_inner(tp))
    else:
      c[name] = v
  return c


def base_config() -> mlc.ConfigDict:
  """The defaults of ``Run()`` as an unlocked ConfigDict."""
  return to_config_dict(Run())


def apply_preset(c: mlc.ConfigDict, preset: str) -> mlc.ConfigDict:
  """Sets ``model.preset`` and ``model.arch`` from MODEL_PRESETS."""
  if preset not in MODEL_PRESETS:
    _fail("model.preset", f"unknown preset {preset!r}; known: {', '.join(MODEL_PRESETS)}")
  with c.unlocked():
    c.model.preset = preset
    c.model.arch = to_config_dict(MODEL_PRESETS[preset])
  return c


# Smallest allowed value of int keys.
_MINIMA = dict(
  [
    ("model.arch." + k, 1)
    for k in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
    )
  ]
  + [
    ("model.lora_rank", 0),
    ("model.latent_hidden_size", 0),
    ("data.batch_size", 1),
    ("data.eval_batch_size", 1),
    ("baselines.proj_hidden_size", 0),
    ("baselines.coconut.n_latents_per_step", 1),
    ("baselines.distill.n_latents", 1),
    ("train.num_steps", 0),
    ("train.log_every", 1),
    ("train.eval_every", 0),
    ("train.ckpt_every", 1),
    ("rollout.max_new_tokens", 1),
    ("rollout.max_latent_steps", 0),
    ("rl.num_steps", 0),
    ("rl.questions_per_step", 1),
    ("rl.group_size", 2),
    ("rl.exp_batch_size", 1),
    ("rl.ppo_epochs", 1),
    ("rl.num_epochs", 0),
  ]
)


def _get(run: Run, key: str):
  for seg in key.split("."):
    run = getattr(run, seg)
  return run


def validate(run: Run) -> Run:
  """Raises ConfigError, naming the dotted key, on a bad value; returns ``run``."""
  for key, lo in _MINIMA.items():
    _check(_get(run, key) >= lo, key, f"must be >= {lo}", _get(run, key))
  a = run.model.arch
  _check(
    a.num_heads % a.num_kv_heads == 0,
    "model.arch.num_kv_heads",
    "must divide num_heads",
    (a.num_heads, a.num_kv_heads),
  )
  for k in ("question_buckets", "steps_buckets", "answer_buckets"):
    b = getattr(run.data, k)
    _check(bool(b) and min(b) >= 1, "data." + k, "must be non-empty and positive", b)
  co = run.colar
  _check(
    bool(co.factors) and min(co.factors) >= 1,
    "colar.factors",
    "must be non-empty, all >= 1",
    co.factors,
  )
  if co.factor_weights:
    _check(
      len(co.factor_weights) == len(co.factors),
      "colar.factor_weights",
      f"needs one weight per factor of {co.factors}",
      co.factor_weights,
    )
    _check(
      min(co.factor_weights) >= 0 and sum(co.factor_weights) > 0,
      "colar.factor_weights",
      "must be >= 0, not all 0",
      co.factor_weights,
    )
  _check(0.0 <= co.auto_prob <= 1.0, "colar.auto_prob", "must be in [0, 1]", co.auto_prob)
  _check(
    co.embed_modeling_loss in ("mse", "nll"),
    "colar.embed_modeling_loss",
    "must be 'mse' or 'nll'",
    co.embed_modeling_loss,
  )
  run.baselines.icot.check("baselines.icot.")
  run.baselines.coconut.curriculum.check("baselines.coconut.curriculum.")
  run.optim.check("optim.")
  run.rl.optim.check("rl.optim.")
  _check(0.0 < run.rollout.top_p <= 1.0, "rollout.top_p", "must be in (0, 1]", run.rollout.top_p)
  _check(
    run.rl.use_latent_loss or run.rl.use_answer_loss,
    "rl.use_answer_loss",
    "need use_latent_loss or use_answer_loss",
    (run.rl.use_latent_loss, run.rl.use_answer_loss),
  )
  sizes = dataclasses.asdict(run.mesh)
  for k, v in sizes.items():
    _check(v == -1 or v >= 1, "mesh." + k, "must be -1 or >= 1", v)
  _check(list(sizes.values()).count(-1) <= 1, "mesh", "-1 on at most one axis", sizes)
  _check(
    run.distributed.initialize in ("auto", "true", "false"),
    "distributed.initialize",
    "must be 'auto', 'true' or 'false'",
    run.distributed.initialize,
  )
  _check(bool(run.method), "method", "must be non-empty", run.method)
  return run


# ----------------------------------------------------------------------------
# Overrides and files.

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse(text: str, tp, key: str):
  """A command-line value as the schema type ``tp``."""
  inner = _optional_inner(tp)
  if inner is not None:  # "none" / "" clear an optional field
    return None if text.strip().lower() in ("", "none") else _parse(text, inner, key)
  try:
    if tp is bool:
      return _BOOLS[text.strip().lower()]
    if tp in (int, float):
      return tp(text)
    if tp is str:
      return text
    if typing.get_args(tp) == (str, Ellipsis) and not text.strip().startswith(("(", "[", "'", '"')):
      return tuple(x.strip() for x in text.split(",") if x.strip())  # q_proj,v_proj
    v = ast.literal_eval(text) if text.strip() else ()
  except (KeyError, ValueError, TypeError, SyntaxError):
    _fail(key, f"expected {_type_name(tp)}, got {text!r}")
  return _convert(v if isinstance(v, (tuple, list)) else (v,), tp, key)


def apply_overrides(c: mlc.ConfigDict, overrides: Sequence[str]) -> mlc.ConfigDict:
  """Applies ``"a.b.c=value"`` items (parsed by schema type), then validates."""
  for item in overrides:
    key, eq, text = item.partition("=")
    key = key.strip().removeprefix("config.")
    if not eq or not key:
      raise ConfigError(f"config: override {item!r} is not KEY=VALUE")
    value = _parse(text, _resolve(key), key)
    *path, leaf = key.split(".")
    with c.unlocked():  # a key an older file dropped may need adding
      node = c
      for seg in path:
        if seg not in node:
          node[seg] = mlc.ConfigDict()
        node = node[seg]
      node[leaf] = value
  from_config_dict(c)
  return c


def load_module(path: str) -> types.ModuleType:
  """A config file as a module (``configs/`` is not a package); the one loader of them."""
  if not os.path.isfile(path):
    raise ConfigError(f"config: no such config file {path!r}")
  name = "_colar_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses in the file look their module up
  try:
    spec.loader.exec_module(module)
  finally:
    sys.modules.pop(name, None)
  return module


def _call_get_config(path: str, arg: str | None):
  module = load_module(path)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config: {path!r} defines no get_config()")
  return get_config() if arg is None else get_config(arg)


def load(spec: str) -> mlc.ConfigDict:
  """Loads ``path.py`` or ``path.py:ARG`` (its ``get_config([ARG])``), validated
  and locked."""
  m = re.fullmatch(r"(.*?\.py)(?::(.*))?", spec, re.DOTALL)
  path, arg = (m.group(1), m.group(2)) if m else (spec, None)
  result = _call_get_config(path, arg)
  if not isinstance(result, (Run, mlc.ConfigDict, Mapping)):
    raise ConfigError(
      f"config: {path!r}: get_config() returned {type(result).__name__}, not a ConfigDict or Run"
    )
  try:
    run = result if isinstance(result, Run) else from_config_dict(result)
    run = validate(run)
  except ConfigError as e:
    raise ConfigError(f"{e} (in {path})") from None
  c = to_config_dict(run)
  c.lock()
  return c


def upgrade_legacy(d: dict[str, Any]) -> dict[str, Any]:
  """Rewrites a run config saved by an older version to the current keys.

  Rules (each applies only when the old key is present; returns a copy):
  * ``colar.max_compression_factor``: "5" (or 5) -> ``colar.factors`` (1..5);
    "1,2,5" -> exactly (1, 2, 5).
  * ``colar.factor_weights`` as a comma string: "" -> (); "1,2,1,6" ->
    (1.0, 2.0, 1.0, 6.0).
  * ``baselines.coconut.{max_latent_stage, epochs_per_stage, start_stage}`` ->
    ``baselines.coconut.curriculum.{max_stage, epochs_per_stage, start_stage}``.
  * ``rl.lr`` -> ``rl.optim.lr``, the rest of ``rl.optim`` copied from the old
    top-level ``optim`` (old RL runs shared SFT's optimizer settings).
  * ``data.synthetic.num_steps`` -> ``min_steps`` = ``max_steps``.
  * ``sharding.rules`` / ``model.arch.rope_scaling`` null -> () (old "none").
  * ``model.lora_targets`` missing with ``model.lora_rank > 0`` -> all seven projections
    (what LoRA runs had before the key; the default is now the reference's q/v).
  Keys still missing afterwards take the defaults.
  """
  d = copy.deepcopy(dict(d))
  colar = d.get("colar", {})
  if "max_compression_factor" in colar:
    v = str(colar.pop("max_compression_factor")).strip().strip(",")
    try:
      factors = (
        [int(x) for x in v.split(",") if x.strip()] if "," in v else list(range(1, int(v) + 1))
      )
    except ValueError:
      _fail("colar.max_compression_factor", f"not an int or a comma list, got {v!r}")
    colar.setdefault("factors", factors)
  if isinstance(colar.get("factor_weights"), str):
    try:
      colar["factor_weights"] = [float(x) for x in colar["factor_weights"].split(",") if x.strip()]
    except ValueError:
      _fail("colar.factor_weights", f"not a comma list, got {colar['factor_weights']!r}")
  coconut = d.get("baselines", {}).get("coconut", {})
  for old, new in (
    ("max_latent_stage", "max_stage"),
    ("epochs_per_stage", "epochs_per_stage"),
    ("start_stage", "start_stage"),
  ):
    if old in coconut:
      coconut.setdefault("curriculum", {})[new] = coconut.pop(old)
  rl = d.get("rl", {})
  if "lr" in rl:
    rl_optim = rl.setdefault("optim", dict(d.get("optim", {})))
    rl_optim["lr"] = rl.pop("lr")
  synthetic = d.get("data", {}).get("synthetic", {})
  if "num_steps" in synthetic:
    n = synthetic.pop("num_steps")
    synthetic.setdefault("min_steps", n)
    synthetic.setdefault("max_steps", n)
  model = d.get("model", {})
  if int(model.get("lora_rank", 0) or 0) > 0 and "lora_targets" not in model:
    model["lora_targets"] = list(LORA_PROJECTIONS)
  for sec, key in (
    (d.get("sharding", {}), "rules"),
    (d.get("model", {}).get("arch", {}), "rope_scaling"),
  ):
    if key in sec and sec[key] is None:
      sec[key] = []
  return d


def save_json(c: mlc.ConfigDict | Run, path: str) -> None:
  """Writes a run config (validated; sorted keys, indent 2)."""
  run = c if isinstance(c, Run) else from_config_dict(c)
  paths.makedirs(paths.parent(path))  # (a workdir may be gs://)
  paths.write_text(path, json.dumps(to_dict(run), indent=2, sort_keys=True) + "\n")


def load_json(path: str) -> mlc.ConfigDict:
  """Reads a saved run config (older versions upgraded), validated and locked."""
  if not paths.is_file(path):
    raise ConfigError(f"config: no such config file {path!r}")
  d = json.loads(paths.read_text(path))
  try:
    c = to_config_dict(from_config_dict(upgrade_legacy(d)))
  except ConfigError as e:
    raise ConfigError(f"{e} (in {path})") from None
  c.lock()
  return c


# ----------------------------------------------------------------------------
# Showing a config.


def flatten(c: mlc.ConfigDict | Mapping[str, Any] | Run) -> dict[str, Any]:
  """Dotted key -> leaf value."""
  if isinstance(c, Run):
    c = to_dict(c)
  elif isinstance(c, mlc.ConfigDict):
    c = c.to_dict()
  out = {}
  for k, v in c.items():
    if isinstance(v, Mapping):
      out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
    else:
      out[k] = v
  return out


def describe(c: mlc.ConfigDict | Run) -> list[tuple[str, Any, Any, str]]:
  """(key, value, default, help) of every leaf key, in schema order."""
  run = c if isinstance(c, Run) else from_config_dict(c)
  out = []

  def walk(obj, default, prefix):
    for f in dataclasses.fields(obj):
      v, dv = getattr(obj, f.name), getattr(default, f.name)
      if _is_section(_hints(type(obj))[f.name]):
        walk(v, dv, prefix + f.name + ".")
      else:
        out.append((prefix + f.name, v, dv, f.metadata["help"]))

  walk(run, Run(), "")
  return out


def format_show(c: mlc.ConfigDict | Run) -> str:
  """One line per key: ``key = value  (default: d)  help``; ``*`` = changed."""
  rows = describe(c)
  lefts = [f"{k} = {v!r}" for k, v, _, _ in rows]
  width = min(max(map(len, lefts)), 60)
  lines = []
  for left, (_, v, dv, help_) in zip(lefts, rows):
    mark = "*" if v != dv else " "
    lines.append(f"{mark} {left:<{width}}  (default: {dv!r})  {help_}")
  return "\n".join(lines)
