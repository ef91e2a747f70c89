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
        --config=configs/base.py:tiny,colar" --root runs/sweep1
    python launch/sweep.py run SWEEP.py --cmd "..." --root runs/sweep1   # sequential, local
    python launch/sweep.py collect --root runs/sweep1                    # one table of eval JSONs

Each run gets its own workdir ``ROOT/<index>_<short name>`` (``--workdir=`` of the
command); evaluate one with ``python -m colar_jax eval --workdir=ROOT/<run>``.
``collect`` reads ``ROOT/*/eval/*.json`` (written by ``python -m colar_jax eval``) and
prints one row per (run, eval file, compression factor).
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
  out = []
  for i, ov in enumerate(runs):
    wd = os.path.join(root, run_name(i, ov))
    argv = shlex.split(base_cmd) + [f"--workdir={wd}"]
    argv += [f"--{k}={v}" for k, v in ov.items()]
    out.append((wd, argv))
  return out


def collect(root: str) -> list[dict[str, Any]]:
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "*", "eval", "*.json"))):
    run = os.path.basename(os.path.dirname(os.path.dirname(path)))
    with open(path) as f:
      res = json.load(f)
    per_c = res.get("factors") or res.get("per_compression") or res
    for c, m in per_c.items():
      if not isinstance(m, dict):
        continue
      rows.append(
        {
          "run": run,
          "eval": os.path.basename(path)[:-5],
          "c": c,
          **{k: v for k, v in m.items() if isinstance(v, (int, float))},
        }
      )
  return rows


def print_table(rows: list[dict[str, Any]]) -> None:
  if not rows:
    print("no eval JSON files found")
    return
  cols = list(dict.fromkeys(k for r in rows for k in r))

  def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
  print("  ".join(c.ljust(widths[c]) for c in cols))
  for r in rows:
    print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="mode", required=True)
  for mode in ("print", "run"):
    s = sub.add_parser(mode)
    s.add_argument("sweep")
    s.add_argument(
      "--cmd",
      required=True,
      help="base command (config file included), e.g. "
      "'python -m colar_jax sft --config=configs/base.py:tiny,colar'",
    )
    s.add_argument("--root", required=True, help="parent dir of the runs' workdirs")
  c = sub.add_parser("collect")
  c.add_argument("--root", required=True)
  args = p.parse_args(argv)
  if args.mode == "collect":
    print_table(collect(args.root))
    return 0
  cmds = commands(load_sweep(args.sweep), args.cmd, args.root)
  failed = 0
  for wd, argv_ in cmds:
    if args.mode == "print":
      print(shlex.join(argv_))
      continue
    print(f"[sweep] {wd}", flush=True)
    failed += subprocess.call(argv_) != 0
  if args.mode == "run":
    print_table(collect(args.root))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
