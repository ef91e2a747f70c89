"""Config files and presets: every documented ``FILE:ARG`` loads, presets build a model,
overrides reach the run, unknown keys fail by name (the schema itself:
``test_config_schema.py``)."""

import pytest

from colar_jax import config, methods
from colar_jax.data import builders
from colar_jax.train.run import model_config

PRESETS = ("tiny", "smollm2_135m", "llama32_1b", "qwen2_1p5b")  # configs/base.py's docstring
METHODS = ("cot", "colar", "nocot", "icot", "coconut", "distill")
PHASES = ("cot", "colar", "rl", "nocot", "icot", "coconut", "distill")


def _run(spec, *overrides):
  return config.from_config_dict(config.apply_overrides(config.load(spec), list(overrides)))


def test_override_and_preset_reach_the_model():
  run = _run("configs/base.py:smollm2_135m,cot", "optim.lr=0.5")
  assert (run.optim.lr, run.method, run.model.preset) == (0.5, "cot", "smollm2_135m")
  assert model_config(run).num_layers == 30
  assert run.model.lora_rank == 128 and run.model.dtype == "bfloat16"  # real-model defaults


def test_unknown_key_fails_with_its_name():
  c = config.load("configs/base.py:tiny")
  with pytest.raises(config.ConfigError, match=r"optim\.lrr.*did you mean optim\.lr\?"):
    config.apply_overrides(c, ["optim.lrr=0.5"])


def test_bad_method_fails_with_key():
  run = _run("configs/base.py:tiny", "method=cocon")  # the schema cannot know the registry
  with pytest.raises(config.ConfigError, match=r"config\.method: 'cocon'"):
    methods.get(run.method)
  with pytest.raises(ValueError, match=r"config\.method"):
    model_config(run)


def test_factors_and_weights_reach_the_colar_method():
  """Successor of configlib.compression_factors / compression_factor_weights: the tuples
  of ``colar.*`` are what the method draws; bad values fail naming their key."""
  colar = methods.get("colar")
  run = _run("configs/base.py:tiny,colar")
  assert colar.train_factors(run) == (1, 2, 3, 4, 5) and colar.factor_weights(run) == ()
  run = _run("configs/base.py:tiny,colar", "colar.factors=1,2,5")
  assert colar.train_factors(run) == (1, 2, 5) and colar.factor_weights(run) == ()
  run = _run("configs/base.py:tiny,colar", "colar.factors=1,2,5", "colar.factor_weights=1,1,2")
  assert colar.factor_weights(run) == (1.0, 1.0, 2.0)
  assert methods.get("cot").train_factors(run) == (1,)  # methods without a speed prompt
  with pytest.raises(config.ConfigError, match=r"config\.colar\.factors"):
    _run("configs/base.py:tiny", "colar.factors=x")
  for bad in ("1,2", "1,-1,2", "0,0,0", "a,b,c"):
    with pytest.raises(config.ConfigError, match=r"config\.colar\.factor_weights"):
      _run("configs/base.py:tiny", "colar.factors=1,2,5", f"colar.factor_weights={bad}")
  # Runs saved with the old comma strings still load.
  d = config.to_dict(config.Run())
  d["colar"].pop("factors")
  d["colar"].update(max_compression_factor="5", factor_weights="")
  assert config.from_config_dict(config.upgrade_legacy(d)).colar.factors == (1, 2, 3, 4, 5)


def test_unknown_synthetic_key_fails_by_name():
  c = config.base_config()
  assert builders.synthetic_task(config.from_config_dict(c).data.synthetic).min_steps == 4
  c.data.synthetic.num_stpes = 3
  with pytest.raises(config.ConfigError, match=r"config\.data\.synthetic\.num_stpes"):
    config.from_config_dict(c)
  c = config.base_config()
  with pytest.raises(config.ConfigError, match=r"data\.synthetic\.num_stpes"):
    config.apply_overrides(c, ["data.synthetic.num_stpes=3"])


def test_all_presets_build_model_configs():
  assert set(config.MODEL_PRESETS) == set(PRESETS)
  for name in config.MODEL_PRESETS:
    run = config.from_config_dict(config.apply_preset(config.base_config(), name))
    mc = model_config(run)
    assert run.model.preset == name and mc.num_layers == config.MODEL_PRESETS[name].num_layers
    assert mc.vocab_size == config.MODEL_PRESETS[name].vocab_size
    assert mc.num_heads % mc.num_kv_heads == 0


def test_base_config_file_every_preset_and_method():
  for preset in PRESETS:
    run = _run(f"configs/base.py:{preset}")
    assert run.model.preset == preset and run.method == "colar"
    for method in METHODS:
      run = _run(f"configs/base.py:{preset},{method}")
      assert run.method == method and run.model.preset == preset
      mc = model_config(run)
      assert mc.hidden_size == config.MODEL_PRESETS[preset].hidden_size
      assert mc.latent_proj_size == methods.get(method).projection_size(run, mc.hidden_size)
  assert config.load("configs/base.py").model.preset == "tiny"  # no arg
  with pytest.raises(config.ConfigError, match=r"config\.model\.preset"):
    config.load("configs/base.py:tinyy")


@pytest.mark.parametrize(
  "path,variant", [("configs/demo.py", "quick"), ("configs/smollm2_gsm8k.py", "smoke")]
)
def test_phase_config_files_load_every_phase(path, variant):
  mod = config.load_module(path)
  assert tuple(mod.PHASES) == PHASES
  for phase in PHASES:
    full = _run(f"{path}:{phase}")
    small = _run(f"{path}:{phase},{variant}")
    for run in (full, small):
      assert run.method == ("colar" if phase == "rl" else phase)
      src = mod.INIT_FROM[phase]
      assert run.init_from == (f"{mod.DEFAULT_ROOT}/{src}" if src else "")
    n = "rl" if phase == "rl" else "train"
    assert getattr(small, n).num_steps < getattr(full, n).num_steps, phase
  with pytest.raises(ValueError, match="unknown phase"):
    config.load(f"{path}:icott")
