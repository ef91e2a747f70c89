"""The embedded demo's training phases under several training seeds (not part of ``make demo``).

    python bench/demo_seeds.py [--seeds 0,1,2] [--workdir runs/demo_seeds] [--phases ...]
        [--test_examples N] [--eval_seeds K] [key=value ...]

Runs ``python -m colar_jax demo`` (``configs/demo.py``) once per seed, with ``seed=S`` (model
init, data order, factor draws, GRPO sampling; the task and its test split stay fixed) in
``<workdir>/seed<S>``, each a normal demo workdir (a rerun reuses finished phases). Prints
min / median / max of accuracy and #L per (method, c) row, the targets met per seed, and
the targets checked on the worst case (every row at its minimum accuracy over seeds), and
writes ``<workdir>/seeds.json`` and ``seeds.md``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colar_jax import demo  # noqa: E402


def summarize(per_seed: dict[int, list[dict]]) -> list[dict]:
  """One row per (phase, c) present in every seed: min / median / max accuracy and #L."""
  keys = [(r["phase"], r["c"]) for r in next(iter(per_seed.values()))]
  out = []
  for phase, c in keys:
    got = [
      next((r for r in rows if (r["phase"], r["c"]) == (phase, c)), None)
      for rows in per_seed.values()
    ]
    if any(g is None for g in got):
      continue
    acc = [g["accuracy"] for g in got]
    n_l = [g["num_latent"] for g in got]
    worst = min(got, key=lambda g: g["accuracy"])
    out.append(
      dict(
        phase=phase,
        method=got[0]["method"],
        c=c,
        acc=(min(acc), statistics.median(acc), max(acc)),
        num_latent=(min(n_l), statistics.median(n_l), max(n_l)),
        worst=worst,
      )
    )
  return out


def format_summary(rows: list[dict], seeds: list[int]) -> str:
  lines = [
    f"| method | c | accuracy % min / median / max ({len(seeds)} seeds) | #L min / median / max |",
    "|---|---|---|---|",
  ]
  for r in rows:
    a = " / ".join(f"{100 * x:.1f}" for x in r["acc"])
    n = " / ".join(f"{x:.2f}" for x in r["num_latent"])
    lines.append(f"| {r['method']} | {r['c']} | {a} | {n} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="runs/demo_seeds")
  p.add_argument("--config", default=str(demo.DEMO_CONFIG))
  p.add_argument("--phases", default="", help="comma list (default: every phase)")
  p.add_argument("--test_examples", type=int, default=None)
  p.add_argument("--eval_seeds", type=int, default=None, help="evaluation seeds per run")
  p.add_argument("--jax_cache_dir", default=None)
  p.add_argument("overrides", nargs="*", help="key=value, applied to every phase")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  per_seed, targets, wall = {}, {}, {}
  for s in seeds:
    t0 = time.perf_counter()
    res = demo.run_pipeline(
      os.path.join(a.workdir, f"seed{s}"),
      config_file=a.config,
      phases=[x.strip() for x in a.phases.split(",") if x.strip()],
      seeds=a.eval_seeds,
      test_examples=a.test_examples,
      jax_cache_dir=a.jax_cache_dir,
      progress=False,
      overrides=[f"seed={s}", *a.overrides],
      log=lambda line, s=s: print(f"[seed {s}] {line}", flush=True),
    )
    per_seed[s], targets[s] = res["rows"], res["targets"]
    wall[s] = time.perf_counter() - t0
  rows = summarize(per_seed)
  table = format_summary(rows, seeds)
  worst = demo.check_targets([r["worst"] for r in rows])
  lines = [table, "", "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | worst case |"]
  lines.append("|---|" + "---|" * (len(seeds) + 1))
  for i, t in enumerate(worst):
    per = [("yes" if targets[s][i]["ok"] else "NO") if i < len(targets[s]) else "-" for s in seeds]
    lines.append(f"| {t['target']} | " + " | ".join(per) + f" | {'yes' if t['ok'] else 'NO'} |")
  lines += ["", "wall per seed: " + ", ".join(f"{s}: {w:.0f}s" for s, w in wall.items())]
  text = "\n".join(lines)
  print("\n" + text)
  os.makedirs(a.workdir, exist_ok=True)
  with open(os.path.join(a.workdir, "seeds.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(a.workdir, "seeds.json"), "w") as f:
    json.dump(dict(seeds=seeds, rows=rows, per_seed=per_seed, wall_s=wall), f, indent=2)


if __name__ == "__main__":
  main()
