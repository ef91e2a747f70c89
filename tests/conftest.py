"""Test set-up: 8 fake CPU devices (sharded == unsharded tests) and a persistent
compilation cache so re-runs of the suite skip most XLA compiles."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

jax.config.update("jax_compilation_cache_dir", str(CACHE / "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
