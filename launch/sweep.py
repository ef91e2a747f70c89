"""Expand a config sweep into runs (big_vision style) and collect their results.

A sweep file defines ``get_sweep(h)`` and returns a list of override dicts built
with the helpers on ``h``::

    def get_sweep(h):
      return h.product([
          h.sweep("config.colar.factors", ["1,2", "1,2,3,4,5"]),
          h.sweep("config.optim.lr", [1e-4, 3e-4]),
      ])

Keys are ``config.<dotted key of the schema>`` (``python -m colar_jax config show
configs/base.py:tiny`` lists them); each becomes ``--config.KEY=VALUE`` of the command.

Usage::

    python launch/sweep.py print SWEEP.py --cmd "python -m colar_jax sft \
        --config=configs/demo.py:colar" --root runs/sweep1 \
        [--eval_cmd "python -m colar_jax eval --compression=1,2,5 --seeds=3"]
    python launch/sweep.py run  SWEEP.py --cmd "..." --root runs/sweep1 [--parallel 2]
    python launch/sweep.py emit SWEEP.py --cmd "..." --root runs/sweep1 --format slurm|pod
    python launch/sweep.py collect --root runs/sweep1        # one table of every point

Each point gets its own workdir ``ROOT/<index>_<short name>`` (``--workdir=`` of the
command) and is a CHAIN: the training command, then (``--eval_cmd``) its evaluation on
the same workdir. ``run`` runs points ``--parallel`` at a time on this machine (each
chain's output in ``<workdir>/sweep.log``); ``emit`` prints them instead as a SLURM array
script (one task per point) or as ``launch/tpu_pod.sh run`` commands (one job per point).
``collect`` reads every point's final train and validation lines of ``metrics.jsonl`` and
any ``eval/*.json`` (written by ``python -m colar_jax eval``), and prints one table: a row
per (point, source, compression factor).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from colar_jax import config


class Hyper:
  """Sweep algebra: ``sweep`` a key, ``product`` / ``zip`` lists of override dicts."""

  @staticmethod
  def sweep(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any) -> list[dict[str, Any]]:
    return [{key: value}]

  @staticmethod
  def product(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for combo in itertools.product(*parts):
      d: dict[str, Any] = {}
      for c in combo:
        d.update(c)
      out.append(d)
    return out

  @staticmethod
  def zip(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    lengths = {len(p) for p in parts}
    if len(lengths) != 1:
      raise ValueError(f"sweep zip: parts have different lengths {sorted(lengths)}")
    out = []
    for combo in zip(*parts):
      d: dict[str, Any] = {}
      for c in combo:
        d.update(c)
      out.append(d)
    return out


def load_sweep(path: str) -> list[dict[str, Any]]:
  mod = config.load_module(path)  # the package's one loader of config-style files
  if not hasattr(mod, "get_sweep"):
    raise SystemExit(f"{path}: defines no get_sweep(h)")
  return mod.get_sweep(Hyper())


def run_name(i: int, overrides: dict[str, Any]) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_.=,-]", "_", f"{i:03d}_" + ",".join(parts))[:120]


def commands(runs: list[dict[str, Any]], base_cmd: str, root: str) -> list[tuple[str, list[str]]]:
  """(workdir, training argv) per sweep point."""
  out = []
  for i, ov in enumerate(runs):
    wd = os.path.join(root, run_name(i, ov))
    argv = shlex.split(base_cmd) + [f"--workdir={wd}"]
    argv += [f"--{k}={v}" for k, v in ov.items()]
    out.append((wd, argv))
  return out


def chains(
  runs: list[dict[str, Any]], base_cmd: str, root: str, eval_cmd: str = ""
) -> list[tuple[str, list[list[str]]]]:
  """(workdir, [train argv, eval argv?]) per sweep point: its commands, in order."""
  out = []
  for wd, argv in commands(runs, base_cmd, root):
    steps = [argv]
    if eval_cmd:
      steps.append(shlex.split(eval_cmd) + [f"--workdir={wd}"])
    out.append((wd, steps))
  return out


def shell_line(steps: list[list[str]]) -> str:
  """One point's chain as a shell line: each command runs only if the previous succeeded."""
  return " && ".join(shlex.join(a) for a in steps)


def run_local(points: list[tuple[str, list[list[str]]]], parallel: int = 1) -> int:
  """Runs the chains, ``parallel`` at a time; returns the number of failed points."""
  pending, running, failed = list(points), [], 0
  while pending or running:
    while pending and len(running) < max(1, parallel):
      wd, steps = pending.pop(0)
      os.makedirs(wd, exist_ok=True)
      log = open(os.path.join(wd, "sweep.log"), "w")  # noqa: SIM115 (closed when it ends)
      print(f"[sweep] start {wd}", flush=True)
      proc = subprocess.Popen(["bash", "-c", shell_line(steps)], stdout=log, stderr=log)
      running.append((wd, proc, log))
    done = next((item for item in running if item[1].poll() is not None), None)
    if done is None:
      time.sleep(0.2)
      continue
    wd, proc, log = done
    running.remove((wd, proc, log))
    log.close()
    rc = proc.wait()
    failed += rc != 0
    print(f"[sweep] {'done' if rc == 0 else f'FAILED ({rc})'} {wd}", flush=True)
  return failed


def emit(
  points: list[tuple[str, list[list[str]]]], fmt: str, *, pod: str = "POD", zone: str = "ZONE"
) -> str:
  """The points as a SLURM array script or as TPU-pod launch commands."""
  if fmt == "slurm":
    lines = [
      "#!/usr/bin/env bash",
      f"#SBATCH --array=0-{len(points) - 1}",
      "#SBATCH --output=%x.%A_%a.log",
      "set -euo pipefail",
      'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    lines += [f"  {i}) {shell_line(steps)} ;;" for i, (_, steps) in enumerate(points)]
    lines += ["esac"]
    return "\n".join(lines)
  if fmt == "pod":
    out = []
    for wd, steps in points:
      job = os.path.basename(wd)
      out += [
        shlex.join(["launch/tpu_pod.sh", "run", pod, zone, "--job", f"{job}.{k}", "--", *argv])
        for k, argv in enumerate(steps)
      ]
    return "\n".join(out)
  raise ValueError(f"--format: {fmt!r} is not slurm or pod")


def _last(path: str, kind: str) -> dict[str, Any] | None:
  """The last ``metrics.jsonl`` line of ``kind`` (train / val)."""
  last = None
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if rec.get("kind") == kind:
        last = rec
  return last


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  return {
    prefix + k.removeprefix("val/"): v
    for k, v in d.items()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("kind",)
  }


def collect(root: str) -> list[dict[str, Any]]:
  """One row per (point, source, factor): the final train / val metrics of each point's
  ``metrics.jsonl`` and every ``eval/*.json`` of its workdir."""
  rows = []
  for wd in sorted(glob.glob(os.path.join(root, "*"))):
    if not os.path.isdir(wd):
      continue
    run = os.path.basename(wd)
    metrics = os.path.join(wd, "metrics.jsonl")
    if os.path.isfile(metrics):
      train, val = _last(metrics, "train"), _last(metrics, "val")
      if train or val:
        row = {"run": run, "eval": "final", "c": ""}
        row.update(_numbers(train or {}, "train_"))
        row.update(_numbers(val or {}, "val_"))
        rows.append(row)
    for path in sorted(glob.glob(os.path.join(wd, "eval", "*.json"))):
      with open(path) as f:
        res = json.load(f)
      for c, m in (res.get("factors") or {}).items():
        if isinstance(m, dict):
          rows.append({"run": run, "eval": os.path.basename(path)[:-5], "c": c, **_numbers(m)})
  return rows


def print_table(rows: list[dict[str, Any]]) -> None:
  if not rows:
    print("no results found (metrics.jsonl or eval/*.json under the run dirs)")
    return
  cols = list(dict.fromkeys(k for r in rows for k in r))

  def fmt(v: Any, col: str = "") -> str:
    if isinstance(v, float) and col.endswith(("accuracy", "accuracy_ci95")):
      return f"{100 * v:.1f}%"  # fractions as percentages (the JSON files keep them raw)
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  widths = {c: max(len(c), *(len(fmt(r.get(c, ""), c)) for r in rows)) for c in cols}
  print("  ".join(c.ljust(widths[c]) for c in cols))
  for r in rows:
    print("  ".join(fmt(r.get(c, ""), c).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="mode", required=True)
  for mode in ("print", "run", "emit"):
    s = sub.add_parser(mode)
    s.add_argument("sweep")
    s.add_argument(
      "--cmd",
      required=True,
      help="base command (config file included), e.g. "
      "'python -m colar_jax sft --config=configs/base.py:tiny,colar'",
    )
    s.add_argument("--eval_cmd", default="", help="run after training on the same workdir")
    s.add_argument("--root", required=True, help="parent dir of the runs' workdirs")
    if mode == "run":
      s.add_argument("--parallel", type=int, default=1, help="points run at a time")
    if mode == "emit":
      s.add_argument("--format", required=True, choices=("slurm", "pod"))
      s.add_argument("--pod", default="POD", help="pod: the TPU name")
      s.add_argument("--zone", default="ZONE", help="pod: the zone")
  c = sub.add_parser("collect")
  c.add_argument("--root", required=True)
  args = p.parse_args(argv)
  if args.mode == "collect":
    print_table(collect(args.root))
    return 0
  points = chains(load_sweep(args.sweep), args.cmd, args.root, args.eval_cmd)
  if args.mode == "print":
    for _, steps in points:
      print(shell_line(steps))
    return 0
  if args.mode == "emit":
    print(emit(points, args.format, pod=args.pod, zone=args.zone))
    return 0
  failed = run_local(points, args.parallel)
  print_table(collect(args.root))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
