"""``make demo``: the embedded default, end to end on a laptop-class CPU.

  python -m colar_jax demo [--workdir runs/demo] [--fresh] [--quick]

1. prepares the synthetic modular-arithmetic chain task (``colar_jax/data/synthetic.py``);
2. trains a tiny Llama from scratch (random init, char tokenizer) through
   CoT SFT -> CoLaR SFT (from the CoT run) -> GRPO (from the CoLaR run), and the No-CoT
   and Coconut baselines (from the CoT run) on the same data;
3. evaluates every run on the held-out test split at compression factors 1/2/3/5 with
   3 seeds (methods whose prompt ignores c are evaluated once);
4. prints the table (method, c, accuracy +- 95% CI over seeds, #L, #L ratio vs CoT) and
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
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from colar_jax import config as cfglib
from colar_jax import evaluate
from colar_jax.data import builders
from colar_jax.train import sft
from colar_jax.train.hooks import answer_kind
from colar_jax.train.rl import loop as rl_loop
from colar_jax.train.run import load_run, setup_compile_cache
from colar_jax.weights import checkpoints

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
LABELS = dict(
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
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


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
  done = finished_step(workdir) if os.path.isdir(workdir) else None
  if stamp and stamp.get("fingerprint") == fp and done is not None and done >= steps:
    log(f"  reusing the finished run in {workdir} (step {done})")
    return dict(stamp, reused=True)
  if os.path.isdir(workdir):
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
      shutil.rmtree(workdir)
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
) -> dict[str, Any]:
  """Accuracy / #L of one run per factor on the first ``n_questions`` (0 = all) test
  questions (cached in ``<workdir>/eval``)."""
  key = dict(
    fingerprint=fp,
    factors=list(factors),
    seeds=int(seeds),
    n_questions=int(n_questions),
    rollout=dataclasses.asdict(c.rollout),
  )
  out_dir = os.path.join(workdir, "eval")
  cached = _read_json(os.path.join(out_dir, EVAL_NAME + ".json"))
  if cached and cached.get("demo_key") == json.loads(json.dumps(key)):
    log(f"  reusing {os.path.join(out_dir, EVAL_NAME + '.json')}")
    return cached
  lr = load_run(workdir)
  rc = lr.run
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
    name=EVAL_NAME,
    templates=lr.templates,
    buckets=lr.buckets,
    progress=progress,
    log=lambda s: None,
    answer_kind=answer_kind(rc),
  )
  res = json.loads(json.dumps(res, default=str))
  res["demo_key"] = json.loads(json.dumps(key))
  res["phase"] = phase
  _write_json(os.path.join(out_dir, EVAL_NAME + ".json"), res)
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
          num_latent=n_lat,
          num_latent_ci95=float(m.get("num_latent_ci95", 0.0)),
          num_latent_ratio=(n_lat / cot_l if cot_l else float("nan")),
          accuracy_per_seed=m.get("accuracy_per_seed"),
        )
      )
  return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
  head = f"| {'method':<11} | {'c':>2} | {'accuracy (%)':>14} | {'#L':>6} | {'#L / CoT':>8} |"
  sep = "|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|"
  lines = [head, sep]
  for r in rows:
    acc = f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_ci95']:.1f}"
    ratio = "" if math.isnan(r["num_latent_ratio"]) else f"{r['num_latent_ratio']:.2f}"
    lines.append(
      f"| {r['method']:<11} | {r['c']:>2} | {acc:>14} | {r['num_latent']:>6.2f} | {ratio:>8} |"
    )
  return "\n".join(lines)


def check_targets(rows: Sequence[dict[str, Any]], rl_c: int | None = None) -> list[dict[str, Any]]:
  """The demo's acceptance targets, measured (a missing row fails its target).

  ``rl_c``: the thinking speed GRPO trained at (``rl.compression_factor``), where
  GRPO is compared with CoLaR-SFT (default: the largest evaluated factor).
  """

  def get(phase: str, c: int | None = None) -> dict[str, Any] | None:
    for r in rows:
      if r["phase"] == phase and (c is None or r["c"] == c):
        return r
    return None

  out = []

  def add(name: str, ok: bool | None, detail: str) -> None:
    out.append(dict(target=name, ok=bool(ok), detail=detail))

  cot, c2, c5 = get("cot"), get("colar", 2), get("colar", 5)
  nocot = get("nocot")
  add(
    "CoT accuracy >= 90%",
    cot and cot["accuracy"] >= 0.90,
    f"{100 * cot['accuracy']:.1f}%" if cot else "missing",
  )
  add(
    "CoLaR c=2 >= 85% at #L <= 0.55x CoT",
    c2 and c2["accuracy"] >= 0.85 and c2["num_latent_ratio"] <= 0.55,
    f"{100 * c2['accuracy']:.1f}% at {c2['num_latent_ratio']:.2f}x" if c2 else "missing",
  )
  add(
    "CoLaR c=5 >= 70% at #L <= 0.25x CoT",
    c5 and c5["accuracy"] >= 0.70 and c5["num_latent_ratio"] <= 0.25,
    f"{100 * c5['accuracy']:.1f}% at {c5['num_latent_ratio']:.2f}x" if c5 else "missing",
  )
  add(
    "No-CoT clearly below CoLaR c=5 (CIs apart)",
    nocot
    and c5
    and (nocot["accuracy"] + nocot["accuracy_ci95"] < c5["accuracy"] - c5["accuracy_ci95"]),
    f"{100 * nocot['accuracy']:.1f}% vs {100 * c5['accuracy']:.1f}%" if nocot and c5 else "missing",
  )
  rl_rows = [r for r in rows if r["phase"] == "rl"]
  if rl_rows:
    if rl_c is None or not any(r["c"] == rl_c for r in rl_rows):
      rl_c = max(r["c"] for r in rl_rows)
    rl, sft = get("rl", rl_c), get("colar", rl_c)
    # "Not worse": the CIs overlap or GRPO is above; "shorter": beyond both #L CIs.
    ok = bool(
      rl
      and sft
      and rl["accuracy"] + rl["accuracy_ci95"] >= sft["accuracy"] - sft["accuracy_ci95"]
      and rl["num_latent"] + rl["num_latent_ci95"] < sft["num_latent"] - sft["num_latent_ci95"]
    )
    add(
      f"GRPO not worse and shorter (beyond the CIs) than CoLaR-SFT (c={rl_c})",
      ok,
      f"{100 * rl['accuracy']:.1f}% / #L {rl['num_latent']:.2f} vs "
      f"{100 * sft['accuracy']:.1f}% / #L {sft['num_latent']:.2f}"
      if rl and sft
      else "missing",
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
  fig.savefig(path, format="png")
  plt.close(fig)


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
  root = os.path.abspath(workdir)
  if fresh and os.path.isdir(root):
    log(f"--fresh: deleting {root}")
    shutil.rmtree(root)
  os.makedirs(root, exist_ok=True)
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
    stamps[p] = run_phase(mod, p, c, os.path.join(root, p), fps[p], log)
    timings[f"train_{p}"] = time.perf_counter() - t0

  log(
    f"[eval] test split, factors {factors}, {seeds} seeds"
    + (f", first {n_q} questions" if n_q else "")
  )
  results: dict[str, dict[str, Any]] = {}
  for p in phases:
    t0 = time.perf_counter()
    results[p] = evaluate_phase(
      p,
      configs[p],
      os.path.join(root, p),
      fps[p],
      factors=factors,
      seeds=seeds,
      n_questions=n_q,
      progress=progress,
      log=log,
    )
    timings[f"eval_{p}"] = time.perf_counter() - t0

  rows = table_rows(results)
  rl_c = int(configs["rl"].rl.compression_factor) if "rl" in configs else None
  targets = check_targets(rows, rl_c) if getattr(mod, "TARGETS", False) and not quick else []
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
    f"{list(range(seeds))}; accuracy = mean ± 1.96·std/√seeds.",
    "",
    table,
    "",
  ]
  if targets:
    md += ["| target | measured | met |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['detail']} | {'yes' if t['ok'] else 'NO'} |" for t in targets]
    md.append("")
  md.append("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")

  log("")
  log(table)
  for t in targets:
    log(f"  [{'ok' if t['ok'] else 'MISSED'}] {t['target']}: {t['detail']}")
  log(
    f"\ntotal {timings['total']:.0f}s; results: {root}/results.md, results.json, accuracy_vs_L.png"
  )
  log(f"workdir: {root}")
  return summary
