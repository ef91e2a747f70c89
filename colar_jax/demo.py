"""``make demo``: the embedded default, end to end on a laptop-class CPU.

  python -m colar_jax demo [--workdir runs/demo] [--fresh] [--quick]

1. prepares the synthetic modular-arithmetic chain task (``colar_jax/data/synthetic.py``);
2. trains a tiny Llama from scratch (random init, char tokenizer) through
   CoT SFT -> CoLaR SFT (from the CoT run) -> GRPO (from the CoLaR run), and the No-CoT,
   iCoT, Coconut and Distill baselines (from the CoT run) on the same data;
3. evaluates every run on the held-out test split at compression factors 1..5 with
   3 seeds (methods whose prompt ignores c are evaluated once);
4. prints the table (method, c, accuracy +- 95% CI over seeds, the 95% CI over questions
   that the targets judge by, #L, #L ratio vs CoT) and
   writes ``results.md``, ``results.json`` and ``accuracy_vs_L.png`` to the workdir.

Every phase is a normal run (``configs/demo.py:PHASE``, ``<workdir>/<phase>``) that the
``sft`` / ``rl`` commands can resume or redo by hand. A phase whose workdir holds a finished run
trained with the same config (and the same upstream runs) is reused, as is its
evaluation, so a second ``make demo`` only prints the table; ``--fresh`` deletes the
workdir first. A phase interrupted mid-way resumes from its last checkpoint.

``--quick`` swaps in a drastically reduced budget (``configs/demo.py:PHASE,quick``: a
few steps per phase, a few test questions, factors 1/2, 2 seeds) to check the plumbing;
its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from colar_jax import config as cfglib
from colar_jax import evaluate, paths
from colar_jax.data import builders
from colar_jax.decode import rollout
from colar_jax.model.compiles import CompileLog
from colar_jax.train import sft
from colar_jax.train.hooks import answer_kind
from colar_jax.train.rl import loop as rl_loop
from colar_jax.train.run import load_converted, load_run, setup_compile_cache
from colar_jax.weights import checkpoints

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
LABELS = dict(
  base="Base 0-shot",
  cot="CoT",
  colar="CoLaR",
  rl="CoLaR+GRPO",
  nocot="No-CoT",
  icot="iCoT",
  coconut="Coconut",
  distill="Distill",
)
STAMP = "demo_stamp.json"
EVAL_NAME = "demo_test"


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
def phase_config(
  mod: Any,
  phase: str,
  root: str,
  *,
  quick: bool,
  jax_cache_dir: str | None,
  progress: bool,
  overrides: Sequence[str] = (),
) -> cfglib.Run:
  """The config of ``phase`` with paths rooted at the demo workdir (and ``overrides``,
  ``key=value`` items applied to every phase)."""
  c = mod.get_config(f"{phase},quick" if quick else phase)
  src = mod.INIT_FROM[phase]
  c.init_from = os.path.join(root, src) if src else ""
  c.data.data_dir = os.path.join(root, "data")
  if jax_cache_dir is not None:
    c.jax_cache_dir = jax_cache_dir
  c.train.progress = progress
  return cfglib.from_config_dict(cfglib.apply_overrides(c, overrides))


def _config_json(c: Any) -> dict[str, Any]:
  d = json.loads(json.dumps(cfglib.to_dict(c) if isinstance(c, cfglib.Run) else c))
  d.get("train", {}).pop("progress", None)  # cosmetic: never a reason to retrain
  d.pop("jax_cache_dir", None)
  return d


def fingerprint(c: Any, upstream: str = "") -> str:
  """Identity of a phase's run: its config plus the identity of the run it starts from."""
  blob = json.dumps(dict(config=_config_json(c), upstream=upstream), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def num_train_steps(c: cfglib.Run, phase_trainer: str) -> int:
  return int(rl_loop.rl_num_steps(c)) if phase_trainer == "rl" else int(c.train.num_steps)


def _read_json(path: str) -> Any:
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: Any) -> None:
  paths.write_text(path, json.dumps(obj, indent=2, default=str))


def finished_step(workdir: str) -> int | None:
  """Step of the latest complete checkpoint of a run, or None."""
  try:
    return int(checkpoints.read_meta(workdir).get("step", -1))
  except (FileNotFoundError, ValueError, KeyError):
    return None


# ----------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------
def run_phase(mod: Any, phase: str, c: Any, workdir: str, fp: str, log: Any) -> dict[str, Any]:
  """Trains ``phase`` unless a finished run with the same fingerprint is there."""
  trainer = mod.TRAINER[phase]
  steps = num_train_steps(c, trainer)
  stamp = _read_json(os.path.join(workdir, STAMP))
  done = finished_step(workdir) if paths.is_dir(workdir) else None
  if stamp and stamp.get("fingerprint") == fp and done is not None and done >= steps:
    log(f"  reusing the finished run in {workdir} (step {done})")
    return dict(stamp, reused=True)
  if paths.is_dir(workdir):
    saved = _read_json(os.path.join(workdir, "config.json"))
    same = (
      saved is not None
      and _config_json_from_saved(saved) == _config_json(c)
      and (stamp is None or stamp.get("fingerprint") == fp)
    )
    if same and done is not None:
      log(f"  resuming {workdir} from step {done}")
    else:
      log(f"  {workdir} holds a run with another config: starting it over")
      paths.path(workdir).rmtree()
  t0 = time.perf_counter()
  last = (rl_loop.train if trainer == "rl" else sft.train)(c, workdir)
  out = dict(
    phase=phase,
    fingerprint=fp,
    steps=steps,
    train_seconds=time.perf_counter() - t0,
    last={k: v for k, v in (last or {}).items() if isinstance(v, (int, float))},
  )
  _write_json(os.path.join(workdir, STAMP), out)
  return dict(out, reused=False)


def _config_json_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
  return _config_json(cfglib.from_config_dict(cfglib.upgrade_legacy(saved)))


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def evaluate_phase(
  phase: str,
  c: cfglib.Run,
  workdir: str,
  fp: str,
  *,
  factors: Sequence[int],
  seeds: int,
  n_questions: int,
  progress: bool,
  log: Any,
  eval_set: dict[str, Any] | None = None,
  loaded: dict[str, Any] | None = None,
  base_model: str = "",
) -> dict[str, Any]:
  """Accuracy / #L of one run per factor on the first ``n_questions`` (0 = all) test
  questions (cached in ``<workdir>/eval``).

  ``eval_set`` (``dataset``, ``source``, ``split``): another dataset's questions (a
  transfer set) instead of the run's test split; ``loaded`` caches the loaded run
  across sets; ``base_model``: a converted dir evaluated as is (``workdir`` only holds
  the results), decoded with ``c``'s token method."""
  key = dict(
    fingerprint=fp,
    factors=list(factors),
    seeds=int(seeds),
    n_questions=int(n_questions),
    rollout=dataclasses.asdict(c.rollout),
  )
  name = EVAL_NAME if not eval_set else f"demo_{eval_set['dataset']}_{eval_set['split']}"
  if eval_set:
    key["eval_set"] = dict(eval_set)
  out_dir = os.path.join(workdir, "eval")
  cached = _read_json(os.path.join(out_dir, name + ".json"))
  if cached and cached.get("demo_key") == json.loads(json.dumps(key)):
    log(f"  reusing {os.path.join(out_dir, name + '.json')}")
    return cached
  loaded = {} if loaded is None else loaded
  if workdir not in loaded:
    loaded[workdir] = load_converted(base_model, c) if base_model else load_run(workdir)
  lr = loaded[workdir]
  rc = lr.run
  if eval_set:
    data = dataclasses.replace(rc.data, dataset=eval_set["dataset"], source=eval_set["source"])
    data_dir = c.data.data_dir
    questions, golds = builders.load_questions(data, eval_set["split"], data_dir)
  else:
    data = rc.data
    questions, golds = builders.load_questions(rc.data, rc.data.test_split, rc.data.data_dir)
  if n_questions > 0:
    questions, golds = questions[:n_questions], golds[:n_questions]
  bs = min(int(rc.data.eval_batch_size), len(questions))
  res = evaluate.evaluate(
    lr.model,
    lr.tokenizer,
    questions,
    golds,
    lr.method,
    factors,
    seeds,
    bs,
    lr.rollout_config(),
    run=rc,
    out_dir=out_dir,
    name=name,
    templates=lr.templates,
    buckets=lr.buckets,
    progress=progress,
    log=lambda s: None,
    answer_kind=answer_kind(dataclasses.replace(rc, data=data)),
  )
  res = json.loads(json.dumps(res, default=str))
  res["demo_key"] = json.loads(json.dumps(key))
  res["phase"] = phase
  _write_json(os.path.join(out_dir, name + ".json"), res)
  return res


# ----------------------------------------------------------------------------
# Table, plot, targets
# ----------------------------------------------------------------------------
def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, c); #L ratio against CoT's #L."""
  cot = results.get("cot")
  cot_l = None
  if cot:
    cot_l = float(next(iter(cot["factors"].values()))["num_latent"])
  rows = []
  for phase in LABELS:
    if phase not in results:
      continue
    for c, m in sorted(results[phase]["factors"].items(), key=lambda kv: int(kv[0])):
      n_lat = float(m["num_latent"])
      rows.append(
        dict(
          phase=phase,
          method=LABELS[phase],
          c=int(c),
          accuracy=float(m["accuracy"]),
          accuracy_ci95=float(m["accuracy_ci95"]),
          # Results cached before this key existed have none (shown as nan; ``_ci``).
          accuracy_ci95_questions=float(m.get("accuracy_ci95_questions", math.nan)),
          num_latent=n_lat,
          num_latent_ci95=float(m.get("num_latent_ci95", 0.0)),
          num_latent_ratio=(n_lat / cot_l if cot_l else float("nan")),
          accuracy_per_seed=m.get("accuracy_per_seed"),
        )
      )
  return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
  """Accuracy +- the CI over seeds (as the paper), then the CI over questions (``± q``)."""
  head = (
    f"| {'method':<11} | {'c':>2} | {'accuracy (%)':>14} | {'± q':>5} | {'#L':>6} "
    f"| {'#L / CoT':>8} |"
  )
  sep = "|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|"
  lines = [head, sep]
  for r in rows:
    acc = f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f}"
    q = f"{100 * r.get('accuracy_ci95_questions', math.nan):.1f}"
    ratio = "" if math.isnan(r["num_latent_ratio"]) else f"{r['num_latent_ratio']:.2f}"
    lines.append(
      f"| {r['method']:<11} | {r['c']:>2} | {acc:>14} | {q:>5} | {r['num_latent']:>6.2f} "
      f"| {ratio:>8} |"
    )
  return "\n".join(lines)


def _ci(r: dict[str, Any]) -> float:
  """The CI a target judges a row by: over questions (evaluate.py's docstring), which
  the targets are about; over seeds where a row has no other."""
  q = r.get("accuracy_ci95_questions", math.nan)
  return r["accuracy_ci95"] if math.isnan(q) else q


def _apart(lo: dict[str, Any], hi: dict[str, Any], margin: float = 0.0) -> bool:
  """``hi``'s accuracy above ``lo``'s by more than ``margin`` beyond both 95% CIs."""
  return hi["accuracy"] - _ci(hi) > lo["accuracy"] + _ci(lo) + margin


def chain_latents(cot_jsonl: str, factors: Sequence[int]) -> dict[int, float]:
  """Mean over CoT's test samples of ceil(chain / c), the chain being CoT's own #L on the
  question ({} without the file): the #L a CoLaR run at c should match."""
  try:
    lines = paths.read_text(cot_jsonl).splitlines()
    lens = [int(json.loads(line)["num_latent"]) for line in lines if line.strip()]
  except (OSError, ValueError, KeyError):
    return {}
  if not lens:
    return {}
  return {int(c): sum(math.ceil(n / int(c)) for n in lens) / len(lens) for c in factors}


def check_targets(
  rows: Sequence[dict[str, Any]],
  rl_c: int | None = None,
  chain: dict[int, float] | None = None,
) -> list[dict[str, Any]]:
  """The demo's acceptance targets (issue 18), measured (a missing row fails its target).

  * CoT >= 90%; CoLaR at every evaluated c >= 90% with #L within 10% of
    ceil(chain / c) (``chain``: per factor, from :func:`chain_latents`; without it
    ceil(#L_CoT / c)); CoLaR c=1 within 3 points of CoT;
    accuracy falls with c no faster than the CIs allow (never rises beyond them).
  * the best latent baseline (iCoT, Coconut, Distill) above No-CoT beyond the CIs.
  * GRPO visible: at some factor #L down >= 15% at unchanged accuracy (CIs overlap), or
    accuracy up >= 3 points at the largest factor beyond the CIs.
  ``rl_c`` is kept for the callers: GRPO is judged at every evaluated factor.
  """
  del rl_c

  def get(phase: str, c: int | None = None) -> dict[str, Any] | None:
    for r in rows:
      if r["phase"] == phase and (c is None or r["c"] == c):
        return r
    return None

  out = []

  def add(name: str, ok: bool | None, detail: str) -> None:
    out.append(dict(target=name, ok=bool(ok), detail=detail))

  def pct(r: dict[str, Any] | None) -> str:
    return f"{100 * r['accuracy']:.1f}%" if r else "missing"

  cot = get("cot")
  add("CoT accuracy >= 90%", cot and cot["accuracy"] >= 0.90, pct(cot))
  colar = sorted((r for r in rows if r["phase"] == "colar"), key=lambda r: r["c"])
  for r in colar:
    want = (chain or {}).get(r["c"])
    if want is None:
      want = math.ceil(cot["num_latent"] / r["c"]) if cot else float("nan")
    add(
      f"CoLaR c={r['c']} >= 90% at #L within 10% of ceil(chain/c)",
      r["accuracy"] >= 0.90 and abs(r["num_latent"] - want) <= 0.10 * want,
      f"{pct(r)} at #L {r['num_latent']:.2f} (ceil(chain/c): {want:.2f})",
    )
  c1 = get("colar", 1)
  add(
    "CoLaR c=1 within 3 points of CoT",
    cot and c1 and c1["accuracy"] >= cot["accuracy"] - 0.03,
    f"{pct(c1)} vs {pct(cot)}",
  )
  rises = [f"c={a['c']}->{b['c']}" for a, b in zip(colar, colar[1:]) if _apart(a, b)]
  add(
    "CoLaR accuracy vs c monotone within the CIs",
    len(colar) > 1 and not rises,
    "rises beyond the CIs at " + ", ".join(rises) if rises else f"{len(colar)} factors",
  )
  nocot = get("nocot")
  latent = [get(p) for p in ("icot", "coconut", "distill")]
  latent = [r for r in latent if r]
  best = max(latent, key=lambda r: r["accuracy"]) if latent else None
  add(
    "best latent baseline above No-CoT (CIs apart)",
    nocot and best and _apart(nocot, best),
    f"{best['method']} {pct(best)} vs No-CoT {pct(nocot)}" if best else "missing",
  )
  rl_rows = sorted((r for r in rows if r["phase"] == "rl"), key=lambda r: r["c"])
  if rl_rows:
    shorter, better = [], []
    for rl in rl_rows:
      sft_row = get("colar", rl["c"])
      if not sft_row or not sft_row["num_latent"]:
        continue
      drop = 1.0 - rl["num_latent"] / sft_row["num_latent"]
      same = not _apart(rl, sft_row) and not _apart(sft_row, rl)
      if drop >= 0.15 and same:
        shorter.append(f"c={rl['c']}: #L -{100 * drop:.0f}%")
      if rl["c"] == rl_rows[-1]["c"] and _apart(sft_row, rl, margin=0.03):
        better.append(f"c={rl['c']}: {pct(rl)} vs {pct(sft_row)}")
    drops = ", ".join(
      f"c={r['c']} {pct(r)} #L {r['num_latent']:.2f}" for r in rl_rows if get("colar", r["c"])
    )
    add(
      "GRPO: #L -15% at unchanged accuracy, or +3 points at the largest c (beyond the CIs)",
      bool(shorter or better),
      "; ".join(shorter + better) if shorter or better else f"neither ({drops})",
    )
  return out


def save_plot(path: str, rows: Sequence[dict[str, Any]], title: str = "") -> None:
  """Accuracy (95% CI) against #L: CoLaR / GRPO as curves over c, the rest as points."""
  import matplotlib  # noqa: PLC0415 (the Agg backend must be chosen before pyplot loads)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  styles = dict(
    cot=("k", "*"),
    colar=("C0", "o"),
    rl=("C3", "s"),
    nocot=("C7", "v"),
    icot=("C1", "^"),
    coconut=("C2", "D"),
    distill=("C4", "P"),
  )
  for phase in ("colar", "rl", "cot", "nocot", "icot", "coconut", "distill"):
    pr = [r for r in rows if r["phase"] == phase]
    if not pr:
      continue
    color, marker = styles[phase]
    xs = [r["num_latent"] for r in pr]
    ys = [100 * r["accuracy"] for r in pr]
    es = [100 * r["accuracy_ci95"] for r in pr]
    ax.errorbar(
      xs,
      ys,
      yerr=es,
      color=color,
      marker=marker,
      capsize=3,
      linestyle="-" if len(pr) > 1 else "none",
      label=LABELS[phase],
    )
    if len(pr) > 1:
      for r, x, y in zip(pr, xs, ys):
        ax.annotate(
          f"c={r['c']}",
          (x, y),
          textcoords="offset points",
          xytext=(4, -10),
          fontsize=7,
          color=color,
        )
  ax.set_xlabel("#L (reasoning steps: latents, or CoT tokens)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()  # a URL too (savefig would open it as a local file)
  fig.savefig(buf, format="png")
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------
def run_pipeline(
  workdir: str = "runs/demo",
  *,
  config_file: str | os.PathLike[str] = DEMO_CONFIG,
  fresh: bool = False,
  quick: bool = False,
  phases: Sequence[str] = (),
  factors: Sequence[int] = (),
  seeds: int | None = None,
  test_examples: int | None = None,
  jax_cache_dir: str | None = None,
  progress: bool = True,
  overrides: Sequence[str] = (),
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains (or reuses) every phase of ``config_file``, evaluates them, writes the table.

  ``config_file`` is a phase file (``configs/demo.py``, ``configs/smollm2_gsm8k.py``):
  ``PHASES``, ``TRAINER``, ``INIT_FROM``, ``DESCRIPTION``, ``eval_settings(quick)`` and
  ``get_config("PHASE[,quick]")``. ``overrides`` (``key=value``) apply to every phase.
  """
  t_start = time.perf_counter()
  mod = cfglib.load_module(str(config_file))
  phases = list(mod.PHASES) if not phases else list(phases)
  for p in phases:
    if p not in mod.PHASES:
      raise cfglib.ConfigError(
        f"config: --phases: unknown phase {p!r}; known: {', '.join(mod.PHASES)}"
      )
    if mod.INIT_FROM[p] and mod.INIT_FROM[p] not in phases:
      raise cfglib.ConfigError(
        f"config: --phases: {p} starts from {mod.INIT_FROM[p]}, which is not listed"
      )
  ev = mod.eval_settings(quick)
  factors = list(factors) if factors else list(ev["factors"])
  seeds = int(seeds if seeds is not None else ev["seeds"])
  n_q = int(test_examples if test_examples is not None else ev["test_examples"])
  root = paths.absolute(workdir)
  if fresh and paths.is_dir(root):
    log(f"--fresh: deleting {root}")
    paths.path(root).rmtree()
  paths.makedirs(root)
  configs = {
    p: phase_config(
      mod, p, root, quick=quick, jax_cache_dir=jax_cache_dir, progress=progress, overrides=overrides
    )
    for p in phases
  }
  setup_compile_cache(configs[phases[0]].jax_cache_dir)
  log(
    f"CoLaR demo -> {root}  ({'quick' if quick else 'full'} budget; jax "
    f"{jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs)"
  )

  # Data (shared by every phase; a synthetic task's tfds config name encodes it).
  t0 = time.perf_counter()
  first = configs[phases[0]]
  name, bcfg = first.data.dataset, builders.builder_config(first.data)
  builders.prepare(name, first.data.data_dir, source=first.data.source or None, config=bcfg)
  sizes = builders.get_builder(name, first.data.data_dir, config=bcfg).info.splits
  task = name + (f" ({bcfg.name})" if bcfg is not None else "")
  log(
    f"[data] {task}: "
    + ", ".join(f"{k} {v.num_examples}" for k, v in sorted(sizes.items()))
    + f"  ({time.perf_counter() - t0:.1f}s)"
  )

  timings: dict[str, float] = {}
  compiles: dict[str, dict[str, Any]] = {}
  fps: dict[str, str] = {}
  stamps: dict[str, Any] = {}
  for i, p in enumerate(phases):
    c = configs[p]
    fps[p] = fingerprint(c, fps.get(mod.INIT_FROM[p], ""))
    steps = num_train_steps(c, mod.TRAINER[p])
    log(
      f"[{i + 1}/{len(phases)}] {LABELS[p]}: {mod.DESCRIPTION[p]} -- {steps} steps"
      + (f", from {mod.INIT_FROM[p]}" if mod.INIT_FROM[p] else "")
    )
    t0 = time.perf_counter()
    with CompileLog() as cl:
      stamps[p] = run_phase(mod, p, c, os.path.join(root, p), fps[p], log)
    timings[f"train_{p}"] = time.perf_counter() - t0
    compiles[f"train_{p}"] = cl.summary()
    log(f"  {cl.line()}")

  log(
    f"[eval] test split, factors {factors}, {seeds} seeds"
    + (f", first {n_q} questions" if n_q else "")
  )
  # The base model's zero-shot row (the CoT phase's ``model.hf_dir``, a converted dir,
  # decoded with its prompt and rollout) where the phase file asks for it
  # (``eval_settings()["base_model"]``).
  base_model = configs["cot"].model.hf_dir if ev.get("base_model") and "cot" in configs else ""
  evals = list(phases)
  if base_model:
    configs["base"] = configs["cot"]
    fps["base"] = fingerprint(configs["cot"], "base:" + paths.absolute(base_model))
    evals.insert(0, "base")
  results: dict[str, dict[str, Any]] = {}
  transfer: dict[str, dict[str, dict[str, Any]]] = {}
  for p in evals:
    t0 = time.perf_counter()
    loaded: dict[str, Any] = {}
    kw = dict(progress=progress, log=log, loaded=loaded)
    kw["base_model"] = base_model if p == "base" else ""
    traced = rollout.compilation_count()
    with CompileLog() as cl:
      results[p] = evaluate_phase(
        p,
        configs[p],
        os.path.join(root, p),
        fps[p],
        factors=factors,
        seeds=seeds,
        n_questions=n_q,
        **kw,
      )
      # Transfer sets (``eval_settings()["transfer"]``: dataset, source, split, seeds,
      # n), evaluated as they are by the same loaded run and rollout program.
      for es in ev.get("transfer", ()):
        tag = f"{es['dataset']}_{es['split']}"
        transfer.setdefault(tag, {})[p] = evaluate_phase(
          p,
          configs[p],
          os.path.join(root, p),
          fps[p],
          factors=factors,
          seeds=int(es.get("seeds", 1)),
          n_questions=int(es.get("n", n_q)),
          eval_set=dict(dataset=es["dataset"], source=es["source"], split=es["split"]),
          **kw,
        )
    timings[f"eval_{p}"] = time.perf_counter() - t0
    # Rollout programs traced (the in-process jit cache: a phase whose model has the
    # same structure and rollout settings as an earlier one reuses its program).
    compiles[f"eval_{p}"] = dict(
      cl.summary(), rollout_programs=rollout.compilation_count() - traced
    )
    log(
      f"  eval {LABELS[p]}: {cl.line()}; {compiles[f'eval_{p}']['rollout_programs']} rollout programs"
    )

  rows = table_rows(results)
  transfer_rows = {tag: table_rows(res) for tag, res in transfer.items()}
  rl_c = int(configs["rl"].rl.compression_factor) if "rl" in configs else None
  chain = chain_latents(os.path.join(root, "cot", "eval", EVAL_NAME + ".jsonl"), factors)
  want_targets = getattr(mod, "TARGETS", False) and not quick
  targets = check_targets(rows, rl_c, chain) if want_targets else []
  table = format_rows(rows)
  timings["total"] = time.perf_counter() - t_start
  n_test = next(iter(results.values()))["num_questions"] if results else 0
  summary = dict(
    workdir=root,
    quick=bool(quick),
    phases=phases,
    factors=factors,
    seeds=seeds,
    num_test_questions=n_test,
    task=task,
    rows=rows,
    targets=targets,
    timings_s={k: round(v, 1) for k, v in timings.items()},
    compiles=compiles,
    transfer={tag: r for tag, r in transfer_rows.items()},
    reused={p: bool(stamps[p].get("reused")) for p in phases},
    cpu_count=os.cpu_count(),
    load_avg=list(os.getloadavg()),
  )
  _write_json(os.path.join(root, "results.json"), summary)
  plot = os.path.join(root, "accuracy_vs_L.png")
  save_plot(plot, rows, title=f"CoLaR demo: {task}")
  md = [
    f"# CoLaR demo results ({'quick' if quick else 'full'} budget)",
    "",
    f"Dataset `{task}`, {n_test} test questions, seeds "
    f"{list(range(seeds))}; accuracy = mean ± 1.96·std/√seeds; ± q: the 95% CI over "
    "questions (evaluate.py), which the targets judge differences by.",
    "",
    table,
    "",
  ]
  for tag, trows in transfer_rows.items():
    md += [f"Transfer set `{tag}` (#L / CoT against CoT on it):", "", format_rows(trows), ""]
  if targets:
    md += ["| target | measured | met |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['detail']} | {'yes' if t['ok'] else 'NO'} |" for t in targets]
    md.append("")
  md.append("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
  paths.write_text(os.path.join(root, "results.md"), "\n".join(md) + "\n")

  log("")
  log(table)
  for tag, trows in transfer_rows.items():
    log(f"\n{tag}:\n{format_rows(trows)}")
  n_comp = sum(v["compiles"] for v in compiles.values())
  s_comp = sum(v["compile_s"] for v in compiles.values())
  log(f"compiles: {n_comp} XLA programs, {s_comp:.0f}s (per phase in results.json)")
  for t in targets:
    log(f"  [{'ok' if t['ok'] else 'MISSED'}] {t['target']}: {t['detail']}")
  log(
    f"\ntotal {timings['total']:.0f}s; results: {root}/results.md, results.json, accuracy_vs_L.png"
  )
  log(f"workdir: {root}")
  return summary
