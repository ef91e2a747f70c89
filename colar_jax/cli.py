"""Shared CLI plumbing: absl flags for ``--config`` / ``--workdir`` and JAX set-up."""

from __future__ import annotations

import os

import jax
from absl import flags
from ml_collections import config_flags

from colar_jax import configlib


def define_flags() -> None:
  """``--config=configs/x.py:arg --config.a.b=v --workdir=DIR`` (unknown keys fail)."""
  config_flags.DEFINE_config_file("config", "configs/base.py:tiny",
                                  "ml_collections config file[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, config)")


def setup_jax(cfg) -> None:
  """Persistent compilation cache (re-compiles drop from seconds to ~1 s on CPU)."""
  if cfg.get("jax_cache_dir", ""):
    os.makedirs(cfg.jax_cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cfg.jax_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def resolved_config():
  """The --config after CLI overrides, re-validated (overrides bypass get_config checks)."""
  cfg = flags.FLAGS.config
  configlib.validate(cfg)
  return cfg
