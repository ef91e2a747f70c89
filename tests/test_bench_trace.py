"""bench/trace_summary.py: device busy time merges overlaps and skips host tracks."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import trace_summary  # noqa: E402


def test_busy_time_merges_overlaps():
  assert trace_summary.busy_time([(0, 10), (5, 15), (50, 100), (60, 70)]) == 65


def test_summary_reports_device_tracks_only(tmp_path):
  ev = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #1"}},
    {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 10, "name": "gemm"},
    {"ph": "X", "pid": 1, "tid": 7, "ts": 5, "dur": 10, "name": "gemm"},
    {"ph": "X", "pid": 1, "tid": 7, "ts": 50, "dur": 50, "name": "fusion"},
    {"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 999, "name": "python"},
  ]
  d = tmp_path / "plugins" / "profile" / "x"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": ev}, f)
  out = subprocess.run(
    [sys.executable, str(ROOT / "bench" / "trace_summary.py"), str(tmp_path)],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "busy 0.07 ms of a 0.10 ms span (65.0%)" in out
  assert "2x" in out and "gemm" in out and "python" not in out and "/host" not in out
