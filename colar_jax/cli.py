"""The one command line: ``python -m colar_jax COMMAND [flags]``.

Every command takes ``--config=FILE[:ARG]`` (a ``get_config(ARG)`` file, big_vision
style) and ``--config.key=value`` overrides of any key of the schema
(``colar_jax/config.py``; ``python -m colar_jax config show FILE:ARG`` lists them all).
A misspelt key fails in one line that names the nearest key. For ``eval`` and
``generate`` the config defaults to the trained run's own, so overrides change how it is
decoded (``--config.rollout.top_p=1.0``).

Adding a command is one function here, decorated with :func:`command`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections as mlc
from absl import logging as absl_logging

from colar_jax import config as cfglib
from colar_jax import demo, evaluate, methods, paths
from colar_jax.data import answers as answer_lib
from colar_jax.data import builders
from colar_jax.data.records import DataFormatError, Record
from colar_jax.decode.generate import Generation, make_generate_fn
from colar_jax.model import sharding as shd
from colar_jax.train import logs, sft
from colar_jax.train.hooks import NonFiniteLossError, answer_kind
from colar_jax.train.rl import loop as rl_loop
from colar_jax.train.run import (
  check_source,
  check_split,
  data_dir_of,
  is_converted_dir,
  load_converted,
  load_run,
  prepare_data,
  run_of_meta,
  setup_compile_cache,
)
from colar_jax.train.workdir import WorkdirBusyError
from colar_jax.weights import checkpoints, convert, export

PROG = "python -m colar_jax"


class OutOfMemoryError(RuntimeError):
  """XLA ran out of device memory in training; the message says what to lower."""


USER_ERRORS = (
  cfglib.ConfigError,
  NonFiniteLossError,
  DataFormatError,
  FileNotFoundError,
  OutOfMemoryError,
  checkpoints.RunFileError,  # an unreadable checkpoint / tokenizer, named
  checkpoints.WriteError,  # a full disk / read-only filesystem: the path + last checkpoint
  WorkdirBusyError,  # another trainer holds the workdir: its host + pid
)


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  fn: Callable[[argparse.Namespace, list[str]], Any]
  help: str
  args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
  config_help: str
  quiet: bool = False  # only the command's own prints (and errors) without --verbose


COMMANDS: dict[str, Command] = {}


def arg(*names: str, **kw: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
  """One argparse argument of a command (``add_argument``'s arguments)."""
  return names, kw


def command(
  name: str,
  help: str,
  *args: tuple[tuple[str, ...], dict[str, Any]],
  config_help: str = "config file[:arg] (default: the schema's defaults)",
  quiet: bool = False,
):
  """Registers ``fn(args, overrides)`` as ``python -m colar_jax NAME``."""

  def deco(fn):
    COMMANDS[name] = Command(name, fn, help, tuple(args), config_help, quiet)
    return fn

  return deco


# ----------------------------------------------------------------------------
# Config plumbing
# ----------------------------------------------------------------------------
def resolve_config(
  spec: str | None, overrides: Sequence[str], base: mlc.ConfigDict | None = None
) -> cfglib.Run:
  """``--config`` (or ``base``, or the schema defaults) with the overrides applied."""
  if spec:
    c = cfglib.load(spec)
  elif base is not None:
    c = base
  else:
    c = cfglib.base_config()
  return cfglib.from_config_dict(cfglib.apply_overrides(c, overrides))


def _split_overrides(rest: Sequence[str]) -> tuple[list[str], list[str]]:
  """``--config.a.b=v`` / ``--config.a.b v`` items -> ``a.b=v``; the rest is unknown."""
  overrides, unknown, i = [], [], 0
  rest = list(rest)
  while i < len(rest):
    a = rest[i]
    if a.startswith("--config."):
      key, sep, value = a[len("--config.") :].partition("=")
      if not sep:
        if i + 1 >= len(rest):
          raise cfglib.ConfigError(f"config.{key}: no value given")
        value, i = rest[i + 1], i + 1
      overrides.append(f"{key}={value}")
    else:
      unknown.append(a)
    i += 1
  return overrides, unknown


def _logging(verbose: bool = False, quiet: bool = False) -> None:
  """Our INFO lines (none with ``quiet``); the libraries' chatter (orbax logs every file
  op at INFO, tfds every custom config at WARNING) only with --verbose."""
  level = logging.INFO if verbose or not quiet else logging.ERROR
  logging.basicConfig(level=level, format="%(levelname)s %(message)s", force=True)
  absl_logging.set_verbosity("info" if verbose else "error")
  if not verbose:
    for name in ("absl", "orbax", "jax", "tensorflow_datasets", "grain"):
      logging.getLogger(name).setLevel(logging.ERROR)
    # Orbax logs each failed write of a save at ERROR with its traceback (hundreds of
    # lines before the one the save raises, which we turn into one line).
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------
_WORKDIR = arg("--workdir", required=True, help="run directory (checkpoints, logs, config)")
_ALLOW_CHANGE = arg(
  "--allow_config_change",
  action="store_true",
  help="resume although keys other than the cadences / num_steps changed (recorded in "
  "WORKDIR/config_changes.jsonl)",
)


def oom_hint(run: cfglib.Run, command: str) -> str:
  """The one line an out-of-memory training run exits with: what to turn on / lower."""
  if command == "rl":
    rl = run.rl
    batch = (
      f"--config.rl.exp_batch_size (now {rl.exp_batch_size}) or the rollout batch "
      f"--config.rl.questions_per_step x rl.group_size (now {rl.questions_per_step} x "
      f"{rl.group_size})"
    )
  else:
    batch = f"--config.data.batch_size (now {run.data.batch_size})"
  remat = (
    "--config.model.remat is already on; lower"
    if run.model.remat
    else "turn on --config.model.remat=true (recompute activations) and/or lower"
  )
  return f"{command}: out of device memory (XLA RESOURCE_EXHAUSTED): {remat} {batch}"


@contextlib.contextmanager
def _oom_as_user_error(hint: str) -> Iterator[None]:
  """XLA's out-of-memory error (a JaxRuntimeError saying RESOURCE_EXHAUSTED, raised at
  compile or run time) -> :class:`OutOfMemoryError` with ``hint``; others pass."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise OutOfMemoryError(hint) from e


def _train(
  args: argparse.Namespace, overrides: list[str], train_fn: Callable, command: str
) -> None:
  run = resolve_config(args.config, overrides)
  setup_compile_cache(run.jax_cache_dir)
  shd.maybe_initialize_distributed(run.distributed)
  if run.train.wandb:
    logs.import_wandb()  # missing: one line now, not after the model is built
  first = checkpoints.last_complete_step(args.workdir)
  t0 = time.perf_counter()
  with _oom_as_user_error(oom_hint(run, command)):
    train_fn(run, args.workdir, allow_config_change=args.allow_config_change)
  if jax.process_index() == 0:
    print(logs.run_summary(command, args.workdir, first, time.perf_counter() - t0), flush=True)


@command(
  "sft",
  "supervised training of any method (cot, colar, nocot, icot, coconut, distill)",
  _WORKDIR,
  _ALLOW_CHANGE,
  config_help="config file[:arg], e.g. configs/base.py:tiny,colar",
)
def sft_cmd(args: argparse.Namespace, overrides: list[str]) -> None:
  _train(args, overrides, sft.train, "sft")


@command(
  "rl",
  "stage 2: GRPO over the latent policy of a CoLaR run (set --config.init_from)",
  _WORKDIR,
  _ALLOW_CHANGE,
  config_help="config file[:arg], e.g. configs/demo.py:rl",
)
def rl_cmd(args: argparse.Namespace, overrides: list[str]) -> None:
  _train(args, overrides, rl_loop.train, "rl")


def _factors(text: str, flag: str = "--compression") -> list[int]:
  try:
    out = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise cfglib.ConfigError(f"config: {flag}: {text!r} is not a comma list of ints") from None
  if not out or min(out) < 1:
    raise cfglib.ConfigError(f"config: {flag}: factors must be >= 1, got {text!r}")
  return out


@command(
  "eval",
  "accuracy +- 95% CI over seeds, #L and a plot, per compression factor",
  _WORKDIR,
  arg("--dataset", default=None, help="dataset name (default: the run's data.dataset)"),
  arg("--source", default=None, help="folder with the raw source files"),
  arg("--data_dir", default=None, help="tfds data dir (default: the run's)"),
  arg("--split", default="test"),
  arg("--compression", default="1,2,3,4,5", help="comma list of factors"),
  arg("--seeds", type=int, default=5),
  arg("--batch_size", type=int, default=None, help="default: data.eval_batch_size"),
  arg("--max_examples", type=int, default=0, help="0 = the whole split"),
  arg("--method", default=None, help="default: the run's method"),
  arg("--out_dir", default=None, help="default: WORKDIR/eval (files <dataset>_<split>.*)"),
  arg(
    "--answer_kind",
    default=None,
    choices=("number", "math"),
    help="default: math for the 'math' dataset, else number",
  ),
  arg("--greedy", action="store_true", help="greedy answer decoding"),
  arg("--no_progress", action="store_true"),
  config_help="config file[:arg] (default: the run's saved config)",
)
def eval_cmd(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
  factors = _factors(args.compression)
  if args.seeds < 1:
    raise cfglib.ConfigError("config: --seeds must be >= 1")
  if args.dataset and args.dataset not in builders.BUILDERS:
    raise cfglib.ConfigError(
      f"config: --dataset: unknown dataset {args.dataset!r}; known: "
      f"{', '.join(sorted(builders.BUILDERS))}"
    )
  base_model = is_converted_dir(args.workdir)
  if not base_model and not export.is_export(args.workdir):
    checkpoints.step_dirs(args.workdir)  # no run there: say so before writing anything
  out_dir = args.out_dir or os.path.join(args.workdir, "eval")
  _check_writable(
    out_dir, "" if args.out_dir else "; pass --out_dir to write the results elsewhere"
  )
  # The questions first (an unknown split fails before the model loads), from the saved
  # config; an export (no checkpoint to read it from) after loading.
  saved = None if base_model else _saved_run(args.workdir)
  qa = None
  if saved is not None:
    base = cfglib.to_config_dict(saved[0])
    qa = _eval_questions(args, resolve_config(args.config, overrides, base=base))
  lr, run = _load_for_decoding(args, overrides)
  setup_compile_cache(run.jax_cache_dir)
  data = dataclasses.replace(run.data, dataset=args.dataset or run.data.dataset)
  questions, golds = qa or _eval_questions(args, run)
  if args.max_examples:
    questions, golds = questions[: args.max_examples], golds[: args.max_examples]
  trained = _trained_factors(lr.run, lr.meta, args.method or lr.method)
  if trained and set(factors) - set(trained):
    logging.warning(
      "--compression %s: the run was trained at thinking speeds %s only",
      args.compression,
      ", ".join(map(str, trained)),
    )
  rc = lr.rollout_config(run.rollout, **({"greedy": True} if args.greedy else {}))
  return evaluate.evaluate(
    lr.model,
    lr.tokenizer,
    questions,
    golds,
    args.method or lr.method,
    factors,
    args.seeds,
    args.batch_size or run.data.eval_batch_size,
    rc,
    run=run,
    out_dir=out_dir,
    name=f"{data.dataset}_{args.split}",
    templates=lr.templates,
    buckets=lr.buckets,
    answer_kind=args.answer_kind or answer_kind(dataclasses.replace(run, data=data)),
    progress=not args.no_progress,
    extra=dict(checkpoint=lr.meta["checkpoint"], step=lr.meta.get("step")),
    # Short batches sized to the work; every prompt at the largest question bucket:
    # one rollout program per batch shape for every factor, seed and dataset.
    bucket_choices=4,
    fixed_prompt_length=True,
  )


def _load_for_decoding(args: argparse.Namespace, overrides: list[str]) -> tuple[Any, cfglib.Run]:
  """(the loaded model, the config it decodes with) of ``--workdir``: a trained run or an
  export (its saved config under ``--config`` / overrides), or a converted base model
  (``convert hf-to-orbax``'s dir; ``--config`` or the schema's defaults, a token method:
  ``--method``, else the config's when it is one, else cot)."""
  if is_converted_dir(args.workdir):
    run = resolve_config(args.config, overrides)
    method = args.method or (run.method if methods.get(run.method).latent_mode == "none" else "cot")
    lr = load_converted(args.workdir, dataclasses.replace(run, method=method))
    return lr, lr.run
  lr = load_run(args.workdir)
  return lr, resolve_config(args.config, overrides, base=cfglib.to_config_dict(lr.run))


def _check_writable(path: str, hint: str) -> None:
  """Results can be written to ``path`` (checked before any work; ``hint``: what to do)."""
  try:
    paths.makedirs(path)
    if paths.is_url(path):  # an object store: write and delete a probe object
      probe = paths.path(paths.join(path, f".write_probe_{os.getpid()}"))
      probe.write_text("")
      probe.unlink()
    else:
      with tempfile.TemporaryFile(dir=path):
        pass
  except OSError as e:
    raise checkpoints.WriteError(f"cannot write {path}: {e.strerror}{hint}") from None


def _saved_run(workdir: str) -> tuple[cfglib.Run, dict[str, Any]] | None:
  """(config, checkpoint meta) of a trained run without its weights (None: an export, or
  no checkpoint)."""
  if export.is_export(workdir):
    return None
  try:
    meta = checkpoints.read_meta(workdir)
  except FileNotFoundError:  # loading the run says so
    return None
  return run_of_meta(meta), meta


def _eval_questions(args: argparse.Namespace, run: cfglib.Run) -> tuple[list[str], list[str]]:
  """(questions, golds) of --dataset / --split; a bad split or source in one line."""
  data = dataclasses.replace(run.data, dataset=args.dataset or run.data.dataset)
  data_dir = args.data_dir or data_dir_of(run, args.workdir)
  source = args.source or data.source or None
  if args.source:
    check_source(args.source, "--source")
  try:
    sizes = prepare_data(
      data.dataset, data_dir, source=source, config=builders.builder_config(data)
    ).sizes
  except (DataFormatError, cfglib.ConfigError):
    raise
  except ValueError as e:  # e.g. a dataset that needs --source and is not prepared
    raise cfglib.ConfigError(f"config: eval: {e}") from None
  check_split(data.dataset, sizes, args.split, "--split")
  return builders.load_questions(data, args.split, data_dir, source=source)


def _trained_factors(run: cfglib.Run, meta: dict[str, Any], method: str) -> tuple[int, ...]:
  """The thinking speeds a run was trained at (its config; GRPO adds its own); () when
  the method's prompt has no speed."""
  m = methods.get(method)
  if not m.prompt.uses_factor:
    return ()
  factors = set(m.train_factors(run))
  if meta.get("stage") == "rl" or meta.get("export", {}).get("stage") == "rl":
    factors.add(int(run.rl.compression_factor))
  return tuple(sorted(factors))


def _check_speed(run: cfglib.Run, meta: dict[str, Any], method: str, speed: int) -> None:
  trained = _trained_factors(run, meta, method)
  if trained and speed not in trained:
    raise cfglib.ConfigError(
      f"config: --speed {speed}: the run was trained at thinking speeds "
      f"{', '.join(map(str, trained))} only (colar.factors of its config)"
    )


def format_generation(g: Generation, answer_prefix: str = "Answer:") -> str:
  pred = answer_lib.extract_answer(g.text, answer_prefix)
  return f"output: {g.text}\nanswer: {pred}\nlatent steps: {g.num_latent}"


def _questions(args: argparse.Namespace, stdin: Iterable[str]) -> Iterable[str]:
  if args.question:
    yield " ".join(args.question)
  if args.interactive:
    for line in stdin:
      if not line.strip():
        return
      yield line.strip()


@command(
  "generate",
  "answer questions with a trained run or a converted base model (one compile, then fast)",
  _WORKDIR,
  arg("question", nargs="*", help="question text (several words are joined)"),
  arg("--speed", type=int, default=1, help="compression factor c of the prompt"),
  arg("--speeds", default=None, help="comma list of factors: each question at each (one compile)"),
  arg("--seed", type=int, default=0),
  arg("--greedy", action="store_true", help="greedy answer decoding"),
  arg("--method", default=None, help="default: the run's method"),
  arg("--interactive", action="store_true", help="read questions from stdin until EOF"),
  config_help="config file[:arg] (default: the run's saved config)",
)
def generate_cmd(
  args: argparse.Namespace, overrides: list[str], stdin: Iterable[str] | None = None
) -> None:
  if not args.interactive and not args.question:
    raise cfglib.ConfigError("config: give a question or --interactive")
  if args.question and not " ".join(args.question).strip():
    raise cfglib.ConfigError("config: the question is empty")
  if args.speed < 1:
    raise cfglib.ConfigError("config: --speed must be >= 1")
  speeds = _factors(args.speeds, "--speeds") if args.speeds else [args.speed]
  saved = None if is_converted_dir(args.workdir) else _saved_run(args.workdir)
  if saved is not None:  # the speeds are checked before the model loads
    for sp in speeds:
      _check_speed(*saved, args.method or saved[0].method, sp)
  lr, run = _load_for_decoding(args, overrides)
  for sp in speeds:
    _check_speed(lr.run, lr.meta, args.method or lr.method, sp)
  rc = lr.rollout_config(run.rollout, **({"greedy": True} if args.greedy else {}))
  # One row, every prompt at the largest question bucket, c in the prompt text: ONE
  # compiled rollout answers every question at every speed.
  gen = make_generate_fn(
    lr.model,
    lr.tokenizer,
    args.method or lr.method,
    rc,
    batch_size=1,
    run=run,
    templates=lr.templates,
    buckets=lr.buckets,
    fixed_prompt_length=True,
  )
  for i, q in enumerate(_questions(args, stdin if stdin is not None else sys.stdin)):
    for sp in speeds:
      (g,) = gen([q], [i], sp, args.seed)
      head = f"speed: {sp}\n" if len(speeds) > 1 else ""
      print(head + format_generation(g, lr.templates.answer_prefix), flush=True)


@command(
  "convert",
  "HF safetensors / .bin / GGUF <-> converted Orbax model dir",
  arg("direction", choices=("hf-to-orbax", "orbax-to-hf")),
  arg("src"),
  arg("dst"),
  arg(
    "--param_dtype",
    default="auto",
    help="hf-to-orbax: stored dtype (auto = the source embedding's dtype)",
  ),
  arg("--dtype", default=None, help="orbax-to-hf: export dtype (default: stored dtype)"),
  arg("--mesh", default="", help="e.g. fsdp=-1 (default: one device)"),
)
def convert_cmd(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
  resolve_config(args.config, overrides)  # validates any given overrides
  if not os.path.exists(args.src):
    raise cfglib.ConfigError(f"config: {args.direction}: {args.src} does not exist")
  t0 = time.time()
  mesh = convert.parse_mesh(args.mesh)
  try:
    if args.direction == "hf-to-orbax":
      summary = convert.hf_to_orbax(args.src, args.dst, param_dtype=args.param_dtype, mesh=mesh)
    else:
      summary = convert.orbax_to_hf(args.src, args.dst, dtype=args.dtype, mesh=mesh)
  except (ValueError, KeyError) as e:
    raise cfglib.ConfigError(f"config: {args.direction}: {e.args[0] if e.args else e}") from None
  summary["seconds"] = round(time.time() - t0, 1)
  summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(json.dumps(summary))
  return summary


@command(
  "export",
  "a trained run as a Hugging Face directory (LoRA merged) plus its CoLaR parts",
  _WORKDIR,
  arg("dst", help="output directory (transformers loads it; eval/generate take it)"),
  arg("--dtype", default=None, help="LM weights dtype (default: the stored one)"),
  arg(
    "--peft",
    action="store_true",
    help="also DST/peft: the un-merged LoRA adapters as a PEFT adapter dir + their base LM",
  ),
  config_help="unused (the run's own config is exported)",
)
def export_cmd(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
  resolve_config(args.config, overrides)  # validates any given overrides
  if export.is_export(args.workdir):
    raise cfglib.ConfigError(f"config: --workdir {args.workdir} is already an export")
  lr = load_run(args.workdir)
  mc = lr.model.cfg
  info = dict(
    method=lr.method,
    embed_std=lr.embed_std,
    step=lr.meta.get("step"),
    source=lr.meta["checkpoint"],
    templates=dataclasses.asdict(lr.templates),
    factors=list(methods.get(lr.method).train_factors(lr.run)),
    latent_proj_size=int(mc.latent_proj_size),
    param_dtype=str(args.dtype or mc.param_dtype),
    pad_as_eos=bool(lr.run.model.hf_dir),
    config=cfglib.to_dict(lr.run),
  )
  if args.peft and mc.lora_rank <= 0:
    raise cfglib.ConfigError(
      f"config: --peft: {args.workdir} has no LoRA adapters (model.lora_rank = 0)"
    )
  summary = export.export_model(
    lr.model,
    args.dst,
    tokenizer_dir=lr.meta["tokenizer_dir"],
    info=info,
    dtype=args.dtype,
    peft=args.peft,
  )
  print(json.dumps(summary))
  return summary


def dropped_line(result: builders.PrepareResult) -> str:
  """How many source records ``data prepare`` left out, and why (the dataset's metadata:
  malformed records skipped with --skip_bad, by kind; GSM8k's empty equation chains)."""
  meta = result.metadata
  n_bad = sum(result.skipped.values())
  reasons = dict(meta.get("skipped_reasons") or {})
  if n_bad and sum(reasons.values()) != n_bad:  # prepared before the kinds were kept
    reasons = {f"malformed in {name}": k for name, k in result.skipped.items() if k}
  empty = int(meta.get("dropped_empty_chain", 0))
  if empty:
    reasons["empty reasoning chain (no <<...>> equation; gsm8k drop_empty_chains)"] = empty
  total = n_bad + empty
  if not total:
    return "dropped: 0 records"
  kept = sum(result.sizes.values())
  why = ", ".join(f"{k} {why}" for why, k in sorted(reasons.items(), key=lambda kv: -kv[1]))
  return f"dropped: {total} of {kept + total} records: {why}"


@command(
  "data",
  "prepare a dataset once (tfds array_record), or show examples",
  arg("action", choices=("prepare", "show")),
  arg("dataset", help="a name of colar_jax.data.builders.BUILDERS"),
  arg("--data_dir", required=True, help="where prepared datasets live"),
  arg("--builder_config", default=None, help="builder config (gsm8k: equations|natural)"),
  arg("--source", default=None, help="prepare: folder (or file) with the source data"),
  arg("--skip_bad", action="store_true", help="prepare: skip and count malformed records"),
  arg("-n", type=int, default=3, help="show: number of examples"),
  arg("--split", default=None, help="show: split (default: the first)"),
  config_help="config file[:arg]; the synthetic task is --config.data.synthetic.*",
)
def data_cmd(args: argparse.Namespace, overrides: list[str]) -> int:
  if args.dataset not in builders.BUILDERS:
    raise cfglib.ConfigError(
      f"config: unknown dataset {args.dataset!r}; known: {', '.join(sorted(builders.BUILDERS))}"
    )
  run = resolve_config(args.config, overrides)
  bcfg: Any = args.builder_config
  if args.dataset == "synthetic":
    if bcfg is not None:
      raise cfglib.ConfigError(
        "config: synthetic takes --config.data.synthetic.KEY=VALUE, not --builder_config"
      )
  if args.action == "prepare" and args.source:
    check_source(args.source, "--source")
  try:  # too few distinct problems, no --source where needed, an unknown --builder_config
    if args.dataset == "synthetic":
      bcfg = builders.synthetic_config(builders.synthetic_task(run.data.synthetic))
    if args.action == "prepare":
      result = prepare_data(
        args.dataset, args.data_dir, source=args.source, config=bcfg, skip_bad=args.skip_bad
      )
    else:
      builder = builders.get_builder(args.dataset, args.data_dir, config=bcfg)
  except (DataFormatError, cfglib.ConfigError):
    raise
  except ValueError as e:
    raise cfglib.ConfigError(f"config: data {args.action}: {e}") from None
  if args.action == "prepare":
    for split, size in sorted(result.sizes.items()):
      print(f"{split}: {size}")
    print(dropped_line(result))
    for msg in result.metadata.get("skipped_examples", [])[:5]:
      print(f"  {msg}")
    if any(result.skipped.values()) and not args.skip_bad:
      print("  (prepared earlier with --skip_bad)")
    return 0
  if not builder.is_prepared():
    raise cfglib.ConfigError(
      f"config: {args.dataset} is not prepared under {args.data_dir}; run `data prepare` first"
    )
  splits = list(builder.info.splits.keys())
  split = args.split or splits[0]
  if split not in splits:
    raise cfglib.ConfigError(f"config: --split: no split {split!r}; have {splits}")
  source = builder.as_data_source(split=split)
  label = (
    f"{args.dataset}/{builder.builder_config.name}" if builder.builder_config else args.dataset
  )
  print(f"{label} {split}: {len(source)}")
  for i in range(min(args.n, len(source))):
    rec = Record.from_example(source[i])
    print(f"--- [{i}] {rec.id}")
    print(f"question: {rec.question}")
    for j, step in enumerate(rec.steps):
      print(f"step {j + 1}: {step}")
    print(f"answer: {rec.answer}")
    for k, v in rec.extras.items():
      print(f"{k}: {v}")
  return 0


@command(
  "demo",
  "the embedded default end to end: train every phase, evaluate, print the table",
  arg("--workdir", default="runs/demo", help="root of the phase runs and results"),
  arg("--fresh", action="store_true", help="delete the workdir first"),
  arg("--quick", action="store_true", help="tiny budget (PHASE,quick) to test the plumbing"),
  arg("--phases", default=None, help="comma list, a prefix-closed subset of the phases"),
  arg("--compression", default=None, help="eval factors (default: the file's)"),
  arg("--seeds", type=int, default=None, help="eval seeds (default: the file's)"),
  arg("--test_examples", type=int, default=None, help="0 = the whole test split"),
  arg("--jax_cache_dir", default=None, help="default: the configs' jax_cache_dir"),
  arg("--no_progress", action="store_true"),
  config_help="phase file (default configs/demo.py; configs/smollm2_gsm8k.py for real "
  "weights); --config.key=value applies to every phase",
  quiet=True,
)
def demo_cmd(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
  with _oom_as_user_error(
    "demo: out of device memory (XLA RESOURCE_EXHAUSTED): turn on --config.model.remat=true "
    "(recompute activations) and/or lower --config.data.batch_size (SFT phases) / "
    "--config.rl.exp_batch_size (GRPO)"
  ):
    return _demo(args, overrides)


def _demo(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
  return demo.run_pipeline(
    args.workdir,
    config_file=args.config or demo.DEMO_CONFIG,
    fresh=args.fresh,
    quick=args.quick,
    phases=[p.strip() for p in (args.phases or "").split(",") if p.strip()],
    factors=_factors(args.compression) if args.compression else (),
    seeds=args.seeds,
    test_examples=args.test_examples,
    jax_cache_dir=args.jax_cache_dir,
    progress=not args.no_progress,
    overrides=overrides,
    log=lambda s: print(s, flush=True),
  )


@command(
  "config",
  "print every key of a config with its value, default and meaning",
  arg("action", choices=("show",)),
  arg("spec", nargs="?", default=None, help="FILE[:ARG] (same as --config)"),
)
def config_cmd(args: argparse.Namespace, overrides: list[str]) -> None:
  run = resolve_config(args.spec or args.config, overrides)
  print(cfglib.format_show(run))


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--verbose",
    action="store_true",
    help="INFO logs of every library and tracebacks for user errors",
  )
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for c in COMMANDS.values():
    sp = sub.add_parser(
      c.name,
      help=c.help.replace("%", "%%"),
      description=c.help,
      epilog="Any key of the config: --config.SECTION.KEY=VALUE "
      f"(list them: {PROG} config show FILE:ARG).",
    )
    sp.add_argument("--config", default=None, metavar="FILE[:ARG]", help=c.config_help)
    sp.add_argument(
      "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    for names, kw in c.args:
      sp.add_argument(*names, **kw)
  return p


def main(argv: Sequence[str] | None = None) -> Any:
  """Parses ``argv`` and runs the command; a user error exits with one ``error:`` line."""
  argv = list(sys.argv[1:] if argv is None else argv)
  p = parser()
  args, rest = p.parse_known_args(argv)
  verbose = bool(getattr(args, "verbose", False))
  try:
    overrides, unknown = _split_overrides(rest)
    if unknown:
      p.error(f"unrecognized arguments: {' '.join(unknown)}")
    cmd = COMMANDS[args.command]
    _logging(verbose, cmd.quiet)
    return cmd.fn(args, overrides)
  except USER_ERRORS as e:
    if verbose:
      raise
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    sys.exit(f"error: {msg}")
