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


def test_cpu_trace_sums_xla_op_threads_without_wrappers(tmp_path):
  """XLA:CPU traces have no device tracks: ops run on the host's tf_XLA* threads."""
  ev = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
    {"ph": "M", "pid": 1, "tid": 6, "name": "thread_name", "args": {"name": "tf_XLAEigen/2"}},
    {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "python"}},
    {"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 100, "name": "while.3"},
    {"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 100, "name": "ThunkExecutor::Execute"},
    {"ph": "X", "pid": 1, "tid": 5, "ts": 10, "dur": 30, "name": "sort.54"},
    {"ph": "X", "pid": 1, "tid": 6, "ts": 10, "dur": 30, "name": "sort.54"},
    {"ph": "X", "pid": 1, "tid": 6, "ts": 50, "dur": 10, "name": "ynn_fusion.2"},
    {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 999, "name": "block_until_ready"},
  ]
  d = tmp_path / "plugins" / "profile" / "x"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": ev}, f)
  hlo = tmp_path / "hlo.txt"
  hlo.write_text(
    '  %sort.54 = (f32[32,49153]{1,0}) sort(%p), metadata={op_name="jit(f)/argsort"}\n'
  )
  out = subprocess.run(
    [sys.executable, str(ROOT / "bench" / "trace_summary.py"), str(tmp_path), "--hlo", str(hlo)],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  summed = out.split("all XLA CPU threads")[1]
  assert "busy 0.04 ms of a 0.05 ms span (80.0%)" in summed  # 10-40 and 50-60 us
  assert "0.060 ms" in summed and "2x" in summed and "jit(f)/argsort" in summed
  for gone in ("while.3", "ThunkExecutor", "block_until_ready"):
    assert gone not in out
