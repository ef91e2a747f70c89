"""The config schema (colar_jax/config.py): defaults, overrides, validation, files."""

import json
import textwrap

import pytest

from colar_jax import config as C


def _error(fn, *args) -> str:
  with pytest.raises(C.ConfigError) as e:
    fn(*args)
  msg = str(e.value)
  assert msg.startswith("config") and "\n" not in msg
  return msg


def test_defaults_sample():
  r = C.Run()
  assert r.seed == 0 and r.method == "colar" and r.init_from == ""
  assert r.model.preset == "tiny" and r.model.attention_impl is None
  assert r.model.lora_alpha == 32.0 and r.model.embed_std == -1.0
  assert r.model.arch.hidden_size == 128 and r.model.arch.num_kv_heads == 2
  assert r.model.arch.rope_scaling == ()
  assert r.data.batch_size == 32 and r.data.step_joiner == "\n"
  assert r.data.question_template == "Question: {} Let's think step by step:"
  assert r.data.steps_buckets == (16, 32, 64, 128, 256)
  assert r.data.synthetic.min_steps == 4 and r.data.synthetic.max_steps == 4
  assert r.data.synthetic.operators == "+-*" and r.data.synthetic.train_size == 20000
  assert r.colar.factors == (1, 2, 3, 4, 5) and r.colar.factor_weights == ()
  assert r.colar.embed_modeling_loss == "mse" and r.colar.end_latent_loss is True
  assert r.baselines.icot == C.Curriculum(epochs_per_stage=2, start_stage=1, max_stage=3)
  assert r.baselines.coconut.curriculum.epochs_per_stage == 2  # reference defaults: test_defaults
  assert r.baselines.coconut.n_latents_per_step == 2
  assert r.baselines.distill.n_latents == 6 and r.baselines.distill.use_proj is True
  assert r.optim.lr == 1e-4 and r.optim.schedule == "constant"
  assert r.rl.optim.lr == 1e-6 and r.rl.optim.grad_clip == 1.0
  assert r.rl.num_steps == 100 and r.rl.group_size == 8 and r.rl.sum_normalizer == 32.0
  assert r.rollout.top_p == 0.9 and r.rollout.eot_temperature == 1.0
  assert r.train.monitor == "val/accuracy" and r.train.ckpt_every == 200
  assert r.mesh == C.Mesh(data=-1, fsdp=1, tensor=1)
  assert r.sharding.rules == () and r.distributed.initialize == "auto"
  assert r.jax_cache_dir == "~/.cache/colar_jax/jax"


def test_every_field_has_help():
  for key, _, _, help_ in C.describe(C.Run()):
    assert help_ and "\n" not in help_, key


def test_base_config_round_trips():
  c = C.base_config()
  assert not c.is_locked
  assert c.model.arch.num_layers == 3 and isinstance(c.data.question_buckets, tuple)
  assert C.from_config_dict(c) == C.Run()
  assert C.from_config_dict(C.to_dict(C.Run())) == C.Run()
  run = C.Run(colar=C.Colar(factors=(1, 3), factor_weights=(1.0, 2.0)))
  assert C.from_config_dict(C.to_config_dict(run)) == run


def test_from_config_dict_converts_lists_and_ints():
  d = C.to_dict(C.Run())
  d["colar"]["factor_weights"] = [1, 2, 1, 6]
  d["colar"]["factors"] = [1, 2, 3, 4]
  d["sharding"]["rules"] = [["batch", ["data", "fsdp"]], ["embed", None]]
  d["optim"]["lr"] = 1
  r = C.from_config_dict(d)
  assert r.colar.factor_weights == (1.0, 2.0, 1.0, 6.0)
  assert isinstance(r.colar.factor_weights[0], float)
  assert r.sharding.rules == (("batch", ("data", "fsdp")), ("embed", None))
  assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)


def test_from_config_dict_rejects_unknown_keys_and_types():
  d = C.to_dict(C.Run())
  d["colar"]["factr_weights"] = ()
  assert "did you mean colar.factor_weights?" in _error(C.from_config_dict, d)
  msg = _error(C.from_config_dict, {"train": {"num_steps": "10"}})
  assert msg.startswith("config.train.num_steps:") and "int" in msg and "'10'" in msg
  msg = _error(C.from_config_dict, {"data": {"question_buckets": 32}})
  assert msg.startswith("config.data.question_buckets:") and "tuple" in msg
  assert _error(C.from_config_dict, {"rl": {"use_latent_loss": 1}}).startswith(
    "config.rl.use_latent_loss:"
  )


def test_overrides_parse_each_type():
  c = C.base_config()
  c.lock()  # overrides must work on a locked dict
  C.apply_overrides(
    c,
    [
      "train.progress=No",
      "model.remat=TRUE",
      "rl.eval_at_start=0",
      "train.num_steps=7",
      "optim.lr=3e-4",
      "model.lora_alpha=16",
      "data.dataset=gsm8k",
      "data.question_template=Q: {} a=b",
      "colar.factors=1,2,5",
      "colar.factor_weights=[1, 2, 3]",
      "data.answer_buckets=(8, 64)",
      "data.question_buckets=5",
      "model.attention_impl=cudnn",
      "model.arch.rope_scaling=(('factor', 8.0), ('rope_type', 'llama3'))",
    ],
  )
  r = C.from_config_dict(c)
  assert (r.train.progress, r.model.remat, r.rl.eval_at_start) == (False, True, False)
  assert r.train.num_steps == 7 and r.optim.lr == 3e-4
  assert r.model.lora_alpha == 16.0 and isinstance(r.model.lora_alpha, float)
  assert r.data.dataset == "gsm8k" and r.data.question_template == "Q: {} a=b"
  assert r.colar.factors == (1, 2, 5) and r.colar.factor_weights == (1.0, 2.0, 3.0)
  assert r.data.answer_buckets == (8, 64) and r.data.question_buckets == (5,)
  assert r.model.attention_impl == "cudnn"
  assert r.model.arch.rope_scaling == (("factor", 8.0), ("rope_type", "llama3"))
  C.apply_overrides(c, ["model.attention_impl=none", "colar.factor_weights="])
  assert c.model.attention_impl is None and c.colar.factor_weights == ()


def test_overrides_errors():
  c = C.base_config()
  msg = _error(C.apply_overrides, c, ["colar.factr_weights=1,2"])
  assert msg.startswith("config.colar.factr_weights: no such key")
  assert "colar.factor_weights" in msg
  msg = _error(C.apply_overrides, c, ["colr.factors=1,2"])
  assert msg.startswith("config.colr.factors:") and "colar.factors" in msg
  assert "known keys in colar" in _error(C.apply_overrides, c, ["colar.qqqqqqqqq=1"])
  assert _error(C.apply_overrides, c, ["colar=3"]).startswith("config.colar:")
  msg = _error(C.apply_overrides, c, ["train.num_steps=many"])
  assert msg.startswith("config.train.num_steps:") and "many" in msg
  assert _error(C.apply_overrides, c, ["train.progress=maybe"]).startswith("config.train.progress:")
  assert _error(C.apply_overrides, c, ["colar.factors=a,b"]).startswith("config.colar.factors:")
  _error(C.apply_overrides, c, ["train.num_steps"])


@pytest.mark.parametrize(
  "overrides, key",
  [
    (["colar.factor_weights=1,2"], "config.colar.factor_weights:"),
    (["colar.factor_weights=0,0,0,0,0"], "config.colar.factor_weights:"),
    (["colar.factors=()"], "config.colar.factors:"),
    (["colar.embed_modeling_loss=l1"], "config.colar.embed_modeling_loss:"),
    (["optim.schedule=linear"], "config.optim.schedule:"),
    (["rl.optim.schedule=linear"], "config.rl.optim.schedule:"),
    (["rl.optim.lr=0"], "config.rl.optim.lr:"),
    (["rl.group_size=1"], "config.rl.group_size:"),
    (["rl.use_latent_loss=false", "rl.use_answer_loss=false"], "config.rl."),
    (["train.ckpt_every=0"], "config.train.ckpt_every:"),
    (["data.batch_size=0"], "config.data.batch_size:"),
    (["data.steps_buckets=()"], "config.data.steps_buckets:"),
    (["rollout.top_p=0"], "config.rollout.top_p:"),
    (["baselines.icot.start_stage=4"], "config.baselines.icot.start_stage:"),
    (
      ["baselines.coconut.curriculum.epochs_per_stage=0"],
      "config.baselines.coconut.curriculum.epochs_per_stage:",
    ),
    (["data.synthetic.min_steps=5"], "config.data.synthetic.min_steps:"),
    (["data.synthetic.operators=+/"], "config.data.synthetic.operators:"),
    (["data.synthetic.step_style=long"], "config.data.synthetic.step_style:"),
    (["mesh.fsdp=-1"], "config.mesh:"),
    (["optim.ema_decay=1"], "config.optim.ema_decay:"),
    (["rl.optim.ema_decay=-0.1"], "config.rl.optim.ema_decay:"),
  ],
)
def test_validate_rejects(overrides, key):
  assert _error(C.apply_overrides, C.base_config(), overrides).startswith(key)


def test_validate_direct_and_weights_ok():
  run = C.Run(optim=C.Optim(schedule="linear"))
  assert _error(C.validate, run).startswith("config.optim.schedule:")
  ok = C.Run(colar=C.Colar(factors=(1, 2), factor_weights=(0.0, 1.0)))
  assert C.validate(ok) is ok
  msg = _error(C.Synthetic, 1, 1, 1, 9, "+", 1)
  assert msg.startswith("config.data.synthetic.modulus:")


def test_presets():
  assert set(C.MODEL_PRESETS) == {"tiny", "smollm2_135m", "llama32_1b", "qwen2_1p5b"}
  for name, arch in C.MODEL_PRESETS.items():
    assert arch.num_heads % arch.num_kv_heads == 0, name
  assert C.MODEL_PRESETS["tiny"] == C.Arch()
  c = C.apply_preset(C.base_config(), "llama32_1b")
  r = C.from_config_dict(c)
  assert r.model.preset == "llama32_1b" and r.model.arch.hidden_size == 2048
  assert dict(r.model.arch.rope_scaling)["rope_type"] == "llama3"
  q = C.MODEL_PRESETS["qwen2_1p5b"]
  assert q.qkv_bias and q.model_type == "qwen2" and not q.tie_embeddings
  msg = _error(C.apply_preset, C.base_config(), "gpt5")
  assert msg.startswith("config.model.preset:") and "'gpt5'" in msg and "tiny" in msg


def _write(tmp_path, body, name="cfg.py"):
  p = tmp_path / name
  p.write_text(textwrap.dedent(body))
  return str(p)


def test_load(tmp_path):
  path = _write(
    tmp_path,
    """
      from colar_jax import config

      def get_config(arg="tiny"):
        c = config.base_config()
        config.apply_preset(c, arg)
        c.train.num_steps = 5
        return c
      """,
  )
  c = C.load(path)
  assert c.is_locked and c.model.preset == "tiny" and c.train.num_steps == 5
  c = C.load(path + ":smollm2_135m")
  assert c.model.preset == "smollm2_135m" and c.model.arch.num_layers == 30
  run_path = _write(
    tmp_path,
    """
      import dataclasses
      from colar_jax import config

      def get_config(method):
        return dataclasses.replace(config.Run(), method=method)
      """,
    "run_cfg.py",
  )
  assert C.load(run_path + ":cot").method == "cot"


def test_load_errors(tmp_path):
  missing = str(tmp_path / "nope.py")
  msg = _error(C.load, missing + ":x")
  assert msg.startswith("config:") and "nope.py" in msg
  bad = _write(
    tmp_path,
    """
      from colar_jax import config

      def get_config():
        c = config.base_config()
        c.colar.factr_weights = (1.0,)
        return c
      """,
    "bad.py",
  )
  msg = _error(C.load, bad)
  assert "colar.factr_weights" in msg and "did you mean colar.factor_weights?" in msg
  msg = _error(C.load, _write(tmp_path, "X = 1\n", "empty.py"))
  assert "empty.py" in msg and "get_config" in msg


def test_save_and_load_json(tmp_path):
  c = C.apply_overrides(
    C.base_config(), ["colar.factors=1,3", "sharding.rules=(('batch', ('data', 'fsdp')),)"]
  )
  path = str(tmp_path / "run" / "config.json")
  C.save_json(c, path)
  text = open(path).read()
  assert json.loads(text)["colar"]["factors"] == [1, 3]
  assert text.index('"baselines"') < text.index('"colar"')  # sorted keys
  back = C.load_json(path)
  assert C.from_config_dict(back) == C.from_config_dict(c)
  assert "nothere.json" in _error(C.load_json, str(tmp_path / "nothere.json"))


def test_load_json_upgrades_legacy(tmp_path):
  legacy = {
    "seed": 3,
    "method": "colar",
    "init_from": "runs/cot",
    "model": {
      "preset": "tiny",
      "attention_impl": None,
      "arch": {
        "vocab_size": 64,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_embeddings": True,
      },
    },
    "data": {
      "batch_size": 16,
      "question_buckets": [32, 64],
      "synthetic": {
        "num_steps": 3,
        "modulus": 10,
        "train_size": 100,
        "val_size": 10,
        "test_size": 10,
        "seed": 1234,
      },
    },
    "colar": {"max_compression_factor": "1,2,5", "factor_weights": "1,2,1"},
    "baselines": {
      "proj_hidden_size": 0,
      "icot": {"epochs_per_stage": 1, "start_stage": 1, "max_stage": 3},
      "coconut": {
        "epochs_per_stage": 2,
        "start_stage": 0,
        "max_latent_stage": 4,
        "n_latents_per_step": 1,
        "use_proj": False,
      },
    },
    "optim": {
      "lr": 1e-4,
      "weight_decay": 0.05,
      "b1": 0.9,
      "b2": 0.95,
      "warmup_steps": 10,
      "schedule": "cosine",
      "grad_clip": 0.5,
      "grad_accum": 2,
    },
    "rl": {"group_size": 4, "lr": 2e-6},
    "sharding": {"rules": None},
  }
  path = tmp_path / "config.json"
  path.write_text(json.dumps(legacy))
  r = C.from_config_dict(C.load_json(str(path)))
  assert r.seed == 3 and r.init_from == "runs/cot" and r.data.batch_size == 16
  assert r.colar.factors == (1, 2, 5) and r.colar.factor_weights == (1.0, 2.0, 1.0)
  assert r.baselines.coconut.curriculum == C.Curriculum(2, 0, 4)
  assert r.baselines.coconut.n_latents_per_step == 1
  assert r.rl.group_size == 4
  assert r.rl.optim == C.Optim(
    lr=2e-6,
    weight_decay=0.05,
    b1=0.9,
    b2=0.95,
    warmup_steps=10,
    schedule="cosine",
    grad_clip=0.5,
    grad_accum=2,
  )
  assert r.data.synthetic.min_steps == 3 and r.data.synthetic.max_steps == 3
  assert r.data.synthetic.train_size == 100 and r.data.synthetic.operators == "+-*"
  assert r.sharding.rules == () and r.model.arch.qkv_bias is False
  assert r.rollout == C.Rollout()  # missing section: defaults

  d = C.upgrade_legacy({"colar": {"max_compression_factor": "5", "factor_weights": ""}})
  assert d == {"colar": {"factors": [1, 2, 3, 4, 5], "factor_weights": []}}
  current = C.to_dict(C.Run())
  assert C.upgrade_legacy(current) == current  # a current config is left alone


def test_flatten_describe_format_show():
  c = C.apply_overrides(
    C.base_config(), ["train.num_steps=5", "rl.optim.lr=1e-5", "data.step_joiner= | "]
  )
  flat = C.flatten(c)
  assert flat["train.num_steps"] == 5 and flat["model.arch.head_dim"] == 32
  assert not any(isinstance(v, dict) for v in flat.values())
  rows = C.describe(c)
  keys = [k for k, *_ in rows]
  assert sorted(keys) == sorted(flat) and len(keys) == len(set(keys))
  assert keys[0] == "seed"
  assert keys.index("model.arch.vocab_size") < keys.index("data.dataset")
  row = dict((k, (v, d)) for k, v, d, _ in rows)
  assert row["rl.optim.lr"] == (1e-5, 1e-6)

  text = C.format_show(c)
  lines = text.splitlines()
  assert len(lines) == len(keys)
  shown = [line[2:].split(" = ", 1)[0] for line in lines]
  assert shown == keys  # every leaf key exactly once, in schema order
  changed = {k for k, line in zip(shown, lines) if line.startswith("*")}
  assert changed == {"train.num_steps", "rl.optim.lr", "data.step_joiner"}
  line = lines[shown.index("train.num_steps")]
  assert "= 5" in line and "(default: 1000)" in line and "SFT optimizer steps" in line
