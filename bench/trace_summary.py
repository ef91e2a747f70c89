"""Where device time goes in a ``jax.profiler`` trace (its perfetto JSON).

    python bench/trace_summary.py TRACE_DIR [--top 25]

For each device track: busy time (sum of op/kernel durations, overlaps merged) over the
span from its first to its last event, i.e. how much of the wall clock the device
actually computed, and the ops with the most total time. A low busy fraction at
batch 1 means the step is bound by launches / host round trips, not by the kernels.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def load_events(path: Path) -> tuple[dict, list[dict]]:
  files = [path] if path.is_file() else sorted(path.rglob("perfetto_trace.json.gz"))
  if not files:
    raise SystemExit(f"trace_summary: no perfetto_trace.json.gz under {path}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  names = {}  # pid -> process name, (pid, tid) -> thread name
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      names[(e["pid"], e.get("tid"))] = e["args"]["name"]
  return names, [e for e in events if e.get("ph") == "X"]


def busy_time(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("trace", type=Path)
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()
  names, events = load_events(a.trace)
  tracks = collections.defaultdict(list)  # device timelines: one per (process, thread)
  for e in events:
    if "/device:" in names.get(e["pid"], ""):
      tracks[(e["pid"], e.get("tid"))].append(e)
  for (pid, tid), evs in sorted(tracks.items(), key=lambda kv: str(kv[0])):
    pname = f"{names[pid]} / {names.get((pid, tid), tid)}"
    spans = [(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in evs]
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    busy = busy_time(spans)
    print(
      f"{pname}: {len(evs)} events, busy {busy / 1e3:.2f} ms of a "
      f"{wall / 1e3:.2f} ms span ({busy / max(wall, 1e-9):.1%})"
    )
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in evs:
      tot[e["name"]] += e.get("dur", 0.0)
      cnt[e["name"]] += 1
    for name, t in tot.most_common(a.top):
      print(f"  {t / 1e3:9.3f} ms  {cnt[name]:6d}x  {t / cnt[name]:8.1f} us  {name[:100]}")


if __name__ == "__main__":
  main()
