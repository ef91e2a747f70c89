"""Config files: presets resolve, CLI overrides apply, unknown keys fail by name."""

import subprocess
import sys

import pytest

from colar_jax import configlib

PROBE = """
from absl import app
from colar_jax import cli
cli.define_flags()
def main(_):
  c = cli.resolved_config()
  print("LR", c.optim.lr, "METHOD", c.method, "LAYERS", configlib_model(c).num_layers)
def configlib_model(c):
  from colar_jax import configlib
  return configlib.model_config(c)
app.run(main)
"""


def _run(repo_root, *args):
  return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)


def test_cli_override_and_preset(repo_root):
  r = _run(repo_root, "--config=configs/base.py:smollm2_135m,cot", "--config.optim.lr=0.5")
  assert r.returncode == 0, r.stderr
  assert "LR 0.5 METHOD cot LAYERS 30" in r.stdout


def test_unknown_key_fails_with_its_name(repo_root):
  r = _run(repo_root, "--config=configs/base.py:tiny", "--config.optim.lrr=0.5")
  assert r.returncode != 0
  assert "lrr" in r.stderr


def test_bad_method_fails_with_key(repo_root):
  r = _run(repo_root, "--config=configs/base.py:tiny", "--config.method=cocon")
  assert r.returncode != 0
  assert "config.method" in r.stderr


def test_compression_factors():
  c = configlib.base_config()
  c.colar.max_compression_factor = "5"
  assert configlib.compression_factors(c) == [1, 2, 3, 4, 5]
  c.colar.max_compression_factor = "1,2,5"
  assert configlib.compression_factors(c) == [1, 2, 5]
  c.colar.max_compression_factor = "x"
  with pytest.raises(ValueError, match="max_compression_factor"):
    configlib.compression_factors(c)


def test_compression_factor_weights():
  c = configlib.base_config()
  c.colar.max_compression_factor = "1,2,5"
  assert configlib.compression_factor_weights(c) == ()
  c.colar.factor_weights = "1,1,2"
  assert configlib.compression_factor_weights(c) == (1.0, 1.0, 2.0)
  for bad in ("1,2", "1,-1,2", "0,0,0", "a,b,c"):
    c.colar.factor_weights = bad
    with pytest.raises(ValueError, match="factor_weights"):
      configlib.compression_factor_weights(c)


def test_unknown_synthetic_key_fails_by_name():
  from colar_jax.train_sft import synthetic_task
  c = configlib.base_config()
  assert synthetic_task(c).min_steps == 4
  c.data.synthetic.num_stpes = 3
  with pytest.raises(ValueError, match=r"data\.synthetic\.num_stpes"):
    synthetic_task(c)


def test_all_presets_build_model_configs():
  for name in configlib.MODEL_PRESETS:
    c = configlib.apply_model_preset(configlib.base_config(), name)
    mc = configlib.model_config(c)
    assert mc.num_heads % mc.num_kv_heads == 0
