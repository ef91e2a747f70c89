"""Where device time goes in a ``jax.profiler`` trace (its perfetto JSON).

    python bench/trace_summary.py TRACE_DIR [--top 25]

For each device track: busy time (sum of op/kernel durations, overlaps merged) over the
span from its first to its last event, i.e. how much of the wall clock the device
actually computed, and the ops with the most total time. A low busy fraction at
batch 1 means the step is bound by launches / host round trips, not by the kernels.

A CPU trace has no device tracks: XLA's CPU ops run on the host's ``tf_XLA*`` threads.
Then each such thread is reported the same way, without the executor's own wrapper spans
(``ThunkExecutor::Execute``, thread-pool waits, and control flow such as ``while.3``,
whose span holds its body's ops), and one table sums each op over all of them (CPU time:
an op split over both cores counts twice). ``--hlo FILE`` (the compiled program's text,
``jax.jit(f).lower(...).compile().as_text()``) adds each op's shape and source op name.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
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


_CONTAINER = re.compile(r"^(while|conditional|call)(\.\d+)?$")
_HLO_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def _wrapper(name: str) -> bool:
  """The CPU executor's spans around ops, and control flow (``while.12``), whose span
  holds its body's ops: either would count those ops twice."""
  return "::" in name or name.startswith("end: ") or bool(_CONTAINER.match(name))


def hlo_annotations(path: Path) -> dict[str, str]:
  """Op name -> "shape  source op" from a compiled HLO text dump."""
  out = {}
  for line in path.read_text().splitlines():
    m = _HLO_OP.match(line)
    if m and m.group(1) not in out:
      src = _OP_NAME.search(line)
      out[m.group(1)] = f"{m.group(2)[:32]:32s} {src.group(1)[-80:] if src else ''}"
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("trace", type=Path)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--hlo", type=Path, default=None, help="compiled HLO text: op shapes/sources")
  a = p.parse_args()
  names, events = load_events(a.trace)
  tracks = collections.defaultdict(list)  # device timelines: one per (process, thread)
  for e in events:
    if "/device:" in names.get(e["pid"], ""):
      tracks[(e["pid"], e.get("tid"))].append(e)
  cpu = not tracks
  if cpu:  # XLA:CPU runs its ops on the host's tf_XLA* threads
    for e in events:
      key = (e["pid"], e.get("tid"))
      if str(names.get(key, "")).startswith("tf_XLA") and not _wrapper(e["name"]):
        tracks[key].append(e)
  if not tracks:
    raise SystemExit(f"trace_summary: no device or XLA CPU tracks in {a.trace}")
  notes = hlo_annotations(a.hlo) if a.hlo else {}
  report(names, tracks, a.top, notes)
  if cpu and len(tracks) > 1:
    merged = {("all", "summed"): [e for evs in tracks.values() for e in evs]}
    report({"all": "all XLA CPU threads"}, merged, a.top, notes)


def report(names: dict, tracks: dict, top: int, notes: dict[str, str]) -> None:
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
    total = sum(tot.values())
    for name, t in tot.most_common(top):
      note = notes.get(name, "")
      print(
        f"  {t / 1e3:9.3f} ms {t / max(total, 1e-9):6.1%}  {cnt[name]:6d}x  "
        f"{t / cnt[name]:8.1f} us  {name[:40]:40s} {note}".rstrip()
      )


if __name__ == "__main__":
  main()
