"""The schema: frozen dataclasses rooted at :class:`Run`, the one place where the
defaults and their meanings live (``metadata["help"]``), and the model presets."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

Pairs = tuple[tuple[str, Any], ...]  # rope_scaling entries, sharding rules
Ints = tuple[int, ...]


class ConfigError(ValueError):
  """A bad config; the message is one line starting with ``config.<key>``."""


def field(default, help):  # pylint: disable=redefined-builtin
  """A dataclass field with a one-line help text (nested sections by factory)."""
  if dataclasses.is_dataclass(default):
    return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
  return dataclasses.field(default=default, metadata={"help": help})


def _fail(key: str, msg: str) -> typing.NoReturn:
  raise ConfigError(f"config.{key}: {msg}")


def _check(ok: bool, key: str, msg: str, value: Any) -> None:
  if not ok:
    _fail(key, f"{msg}, got {value!r}")


# A Llama / Qwen2 block's projections (``model.decoder.LORA_PROJECTIONS``), and the ones
# PEFT adapts for ``LoraConfig(r, lora_alpha)`` without ``target_modules`` on llama / qwen2
# (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): the reference's LoRA.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Arch:
  """Model architecture, used when ``model.hf_dir`` is empty."""

  vocab_size: int = field(64, "Vocabulary size.")
  hidden_size: int = field(128, "Residual stream width.")
  intermediate_size: int = field(384, "MLP hidden width.")
  num_layers: int = field(3, "Decoder layers.")
  num_heads: int = field(4, "Query heads.")
  num_kv_heads: int = field(2, "Key/value heads (grouped-query attention).")
  head_dim: int = field(32, "Width of one attention head.")
  rms_norm_eps: float = field(1e-6, "RMSNorm epsilon.")
  rope_theta: float = field(10000.0, "RoPE base frequency.")
  tie_embeddings: bool = field(True, "LM head shares the input embedding.")
  qkv_bias: bool = field(False, "Bias on the q/k/v projections (Qwen2).")
  model_type: str = field("llama", "HF model family.")
  rope_scaling: Pairs = field((), "RoPE scaling (key, value) pairs; () = none.")


@dataclasses.dataclass(frozen=True)
class Model:
  preset: str = field("tiny", "Name of the Arch preset (MODEL_PRESETS).")
  hf_dir: str = field("", "Converted dir: config.json, tokenizer, orbax params; overrides arch.")
  dtype: str = field("float32", "Compute dtype.")
  param_dtype: str = field("float32", "Parameter dtype.")
  remat: bool = field(False, "jax.checkpoint per layer.")
  attention_impl: str | None = field(
    None, "jax.nn.dot_product_attention implementation; None = xla."
  )
  lora_rank: int = field(0, "LoRA rank; 0 = full fine-tuning.")
  lora_alpha: float = field(32.0, "LoRA alpha.")
  lora_targets: tuple[str, ...] = field(
    LORA_DEFAULT_TARGETS, "Projections given LoRA adapters (reference = PEFT's llama default)."
  )
  latent_hidden_size: int = field(0, "Latent head MLP width; 0 = hidden size.")
  latent_deterministic: bool = field(False, "Latent head: mean only (ablation DL).")
  embed_std: float = field(
    -1.0, "Latent scale; <0 = init_from's, embed_std.json's or the embedding matrix's std."
  )
  arch: Arch = field(Arch(), "Architecture used when hf_dir is empty.")

  def __post_init__(self):
    unknown = [t for t in self.lora_targets if t not in LORA_PROJECTIONS]
    _check(
      not unknown and len(set(self.lora_targets)) == len(self.lora_targets),
      "model.lora_targets",
      f"must be distinct names among {', '.join(LORA_PROJECTIONS)}",
      self.lora_targets,
    )


@dataclasses.dataclass(frozen=True)
class Synthetic:
  """The generated arithmetic task; every field is part of the dataset identity."""

  min_steps: int = field(4, "Fewest reasoning steps per problem.")
  max_steps: int = field(4, "Most reasoning steps per problem.")
  operand_min: int = field(1, "Smallest operand.")
  operand_max: int = field(9, "Largest operand.")
  operators: str = field("+-*", "Operators to draw (a subset of '+-*').")
  modulus: int = field(10, "Results are taken modulo this.")
  train_size: int = field(20000, "Train examples.")
  val_size: int = field(500, "Validation examples.")
  test_size: int = field(500, "Test examples.")
  seed: int = field(1234, "Generator seed.")
  step_style: str = field("full", "'full': each step 'a*b=c'; 'short': '*b=c'.")
  max_noop_steps: int = field(0, "Redundant '9=9' steps appended: min..max, uniform.")
  min_noop_steps: int = field(0, "Fewest redundant steps on a problem that gets them.")
  noop_percent: int = field(100, "Percent of problems that get the no-op steps.")

  def __post_init__(self):
    p = "data.synthetic."
    _check(
      1 <= self.min_steps <= self.max_steps,
      p + "min_steps",
      "need 1 <= min_steps <= max_steps",
      (self.min_steps, self.max_steps),
    )
    _check(
      self.operand_min <= self.operand_max,
      p + "operand_min",
      "need operand_min <= operand_max",
      (self.operand_min, self.operand_max),
    )
    _check(
      bool(self.operators) and set(self.operators) <= set("+-*"),
      p + "operators",
      "must be a non-empty subset of '+-*'",
      self.operators,
    )
    _check(self.modulus >= 2, p + "modulus", "must be >= 2", self.modulus)
    for k in ("train_size", "val_size", "test_size", "max_noop_steps", "min_noop_steps"):
      _check(getattr(self, k) >= 0, p + k, "must be >= 0", getattr(self, k))
    _check(
      self.step_style in ("full", "short"),
      p + "step_style",
      "must be 'full' or 'short'",
      self.step_style,
    )
    _check(
      0 <= self.noop_percent <= 100, p + "noop_percent", "must be in [0, 100]", self.noop_percent
    )
    _check(
      self.min_noop_steps <= self.max_noop_steps,
      p + "min_noop_steps",
      "need min_noop_steps <= max_noop_steps",
      (self.min_noop_steps, self.max_noop_steps),
    )


@dataclasses.dataclass(frozen=True)
class Data:
  dataset: str = field("synthetic", "Dataset name.")
  source: str = field("", "Raw source files dir (tfds manual_dir).")
  data_dir: str = field("", "tfds data dir; '' = <workdir>/../data.")
  tokenizer: str = field(
    "", "HF tokenizer dir; '' = model dir or init_from's, else a char tokenizer is trained."
  )
  train_split: str = field("train", "Train split.")
  val_split: str = field("val", "Validation split.")
  test_split: str = field("test", "Test split.")
  batch_size: int = field(32, "Global train batch size.")
  eval_batch_size: int = field(64, "Global eval batch size.")
  question_template: str = field(
    "Question: {} Let's think step by step:", "Prompt around the question."
  )
  speed_template: str = field("(Thinking speed: {})", "Compression factor prompt.")
  thinking_separator: str = field("###", "Between the reasoning and the answer.")
  step_joiner: str = field("\n", "Between reasoning steps.")
  steps_template: str = field("{}", "Around the joined steps; '{}\\n' = a trailing joiner.")
  answer_template: str = field("Answer:{}", "Around the answer.")
  question_buckets: Ints = field((32, 64, 128, 256), "Padded question lengths.")
  steps_buckets: Ints = field((16, 32, 64, 128, 256), "Padded reasoning lengths.")
  answer_buckets: Ints = field((8, 16, 32), "Padded answer lengths.")
  synthetic: Synthetic = field(Synthetic(), "The synthetic arithmetic task.")


@dataclasses.dataclass(frozen=True)
class Colar:
  """CoLaR SFT."""

  factors: Ints = field(
    (1, 2, 3, 4, 5), "Compression factors drawn per batch (reference max_compression_factor=5)."
  )
  factor_weights: tuple[float, ...] = field((), "One weight >= 0 per factor; () = uniform.")
  auto_prob: float = field(0.0, "Probability the prompt says 'auto'.")
  sqrt_mean: bool = field(True, "Divide a block's sum by sqrt(#real tokens); MP ablation: False.")
  random_label: bool = field(True, "Block CE label = one random real token (OC ablation).")
  embed_modeling_loss: str = field("mse", "Latent loss: 'mse' or 'nll'.")
  ce_weight: float = field(1.0, "Token CE weight.")
  embed_modeling_weight: float = field(1.0, "Latent loss weight.")
  entropy_weight: float = field(0.0, "Latent entropy weight.")
  pred_embed_forward_weight: float = field(
    0.0, "Weight of the loss on predicted latents fed forward."
  )
  end_latent_loss: bool = field(
    True, "Latent loss at a chain's last position (target: the answer's first embedding)."
  )


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Stage of an epoch: min(max_stage, start_stage + epoch // epochs_per_stage)."""

  epochs_per_stage: int = field(2, "Epochs per stage.")
  start_stage: int = field(1, "Stage of epoch 0.")
  max_stage: int = field(3, "Last stage.")

  def check(self, prefix: str) -> None:
    _check(
      self.epochs_per_stage >= 1, prefix + "epochs_per_stage", "must be >= 1", self.epochs_per_stage
    )
    _check(
      0 <= self.start_stage <= self.max_stage,
      prefix + "start_stage",
      "need 0 <= start_stage <= max_stage",
      (self.start_stage, self.max_stage),
    )


@dataclasses.dataclass(frozen=True)
class Coconut:
  curriculum: Curriculum = field(
    Curriculum(epochs_per_stage=2, start_stage=1, max_stage=3), "Stage schedule (reference: 2)."
  )
  n_latents_per_step: int = field(2, "Continuous thoughts per replaced step.")
  use_proj: bool = field(False, "Latent projection MLP.")


@dataclasses.dataclass(frozen=True)
class Distill:
  """CODI."""

  n_latents: int = field(6, "Student latent tokens.")
  alpha: float = field(1.0, "Teacher CE weight.")
  beta: float = field(1.0, "Student CE weight.")
  gamma: float = field(20.0, "Distillation weight (reference: 20).")
  div_std: bool = field(False, "Divide the distillation loss by the teacher's std.")
  use_proj: bool = field(True, "Latent projection MLP.")


@dataclasses.dataclass(frozen=True)
class Baselines:
  proj_hidden_size: int = field(0, "Latent projection MLP width; 0 = hidden size.")
  icot: Curriculum = field(Curriculum(), "iCoT stage schedule (reference: 2 epochs per stage).")
  coconut: Coconut = field(Coconut(), "Coconut.")
  distill: Distill = field(Distill(), "CODI.")


@dataclasses.dataclass(frozen=True)
class Optim:
  lr: float = field(1e-4, "Peak learning rate (AdamW).")
  weight_decay: float = field(0.01, "AdamW weight decay.")
  b1: float = field(0.9, "Adam beta1.")
  b2: float = field(0.999, "Adam beta2.")
  warmup_steps: int = field(0, "Linear warmup steps.")
  schedule: str = field("constant", "'constant' or 'cosine'.")
  grad_clip: float = field(0.0, "Global gradient norm clip; 0 = off (reference SFT: off).")
  grad_accum: int = field(1, "Micro-batches per optimizer step.")
  ema_decay: float = field(
    0.0,
    "EMA (Polyak) average of the trainable params per update, decay min(d, (1+n)/(10+n)); "
    "checkpoints' params, validation, eval, export and init_from use it. 0 = off.",
  )

  def check(self, prefix: str) -> None:
    _check(self.lr > 0, prefix + "lr", "must be > 0", self.lr)
    _check(
      self.schedule in ("constant", "cosine"),
      prefix + "schedule",
      "must be 'constant' or 'cosine'",
      self.schedule,
    )
    _check(self.grad_accum >= 1, prefix + "grad_accum", "must be >= 1", self.grad_accum)
    _check(0.0 <= self.ema_decay < 1.0, prefix + "ema_decay", "must be in [0, 1)", self.ema_decay)


@dataclasses.dataclass(frozen=True)
class Train:
  num_steps: int = field(1000, "SFT optimizer steps.")
  log_every: int = field(10, "Log every n steps.")
  eval_every: int = field(200, "Evaluate every n steps; 0 = never.")
  eval_examples: int = field(200, "Validation examples per evaluation.")
  ckpt_every: int = field(200, "Checkpoint every n steps.")
  keep_last: int = field(2, "Latest checkpoints kept.")
  keep_best: int = field(1, "Best checkpoints kept (by monitor).")
  monitor: str = field("val/accuracy", "Metric ranking checkpoints.")
  progress: bool = field(True, "Show a progress bar.")
  wandb: bool = field(False, "Also log to Weights & Biases (needs `pip install wandb`).")
  wandb_project: str = field("colar_jax", "W&B project.")
  wandb_mode: str = field("offline", "W&B mode: offline (no network; wandb sync) or online.")

  def __post_init__(self):
    _check(
      self.wandb_mode in ("offline", "online"),
      "train.wandb_mode",
      "must be 'offline' or 'online'",
      self.wandb_mode,
    )


@dataclasses.dataclass(frozen=True)
class Rollout:
  max_latent_steps: int = field(64, "Most latent steps.")
  latent_temperature: float = field(1.0, "Latent head temperature.")
  eot_temperature: float = field(1.0, "End-of-thinking draw temperature.")
  temperature: float = field(1.0, "Answer token temperature.")
  top_p: float = field(0.9, "Answer token nucleus mass (within the top-k).")
  top_k: int = field(50, "Answer tokens: keep the k most likely before top-p (HF's); 0 = off.")
  max_new_tokens: int = field(16, "Most answer tokens.")
  greedy: bool = field(False, "Argmax / mean instead of sampling.")

  def __post_init__(self):
    _check(self.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)", self.top_k)


@dataclasses.dataclass(frozen=True)
class RL:
  """Stage 2: GRPO."""

  num_steps: int = field(100, "RL steps of questions_per_step x group_size rollouts.")
  optim: Optim = field(
    Optim(lr=1e-6, weight_decay=0.01, schedule="constant", grad_clip=1.0),
    "RL's optimizer (reference: constant 1e-6).",
  )
  questions_per_step: int = field(8, "Global questions per RL step.")
  group_size: int = field(8, "Samples per question (GRPO group).")
  exp_batch_size: int = field(8, "Samples per optimizer update (reference: 8).")
  ppo_epochs: int = field(1, "Passes over each RL step's experience.")
  clip_eps: float = field(0.2, "PPO ratio clip.")
  clip_log_ratio: float = field(
    0.0, ">0: clamp logp - logp_old to [-x, x] before the exp (not in the reference); 0 = off."
  )
  use_latent_loss: bool = field(True, "Policy loss on the latents.")
  use_answer_loss: bool = field(True, "Policy loss on the answer tokens.")
  average_per_token: bool = field(
    False, "Per-token mean; False (reference): per-sequence sum / sum_normalizer."
  )
  sum_normalizer: float = field(32.0, "Divisor of the per-sequence sum.")
  kl_weight: float = field(0.0, ">0: k3 KL to the frozen init_from policy.")
  punish_latent_length: bool = field(False, "Reward = correct / #latents.")
  compression_factor: int = field(5, "Thinking speed in RL prompts and validation.")
  explore_eot_temperature: float = field(
    0.0,
    ">0: end-of-thinking draw temperature of the GRPO rollouts (exploration; log-probs "
    "stay untempered; validation and eval keep rollout.eot_temperature); 0 = the same.",
  )
  n_train_samples_per_epoch: int = field(512, "Questions per RL epoch.")
  num_epochs: int = field(0, ">0: num_epochs epochs instead of num_steps.")
  eval_at_start: bool = field(True, "Validate before the first RL step.")

  def __post_init__(self):
    # Also checked by validate(); here too because the jitted GRPO update takes this
    # section directly (a group of one has no relative advantage: NaN).
    _check(self.group_size >= 2, "rl.group_size", "must be >= 2", self.group_size)
    _check(self.clip_log_ratio >= 0, "rl.clip_log_ratio", "must be >= 0", self.clip_log_ratio)
    _check(
      self.explore_eot_temperature >= 0,
      "rl.explore_eot_temperature",
      "must be >= 0 (0 = rollout.eot_temperature)",
      self.explore_eot_temperature,
    )
    _check(
      self.use_latent_loss or self.use_answer_loss,
      "rl.use_answer_loss",
      "at least one of use_latent_loss / use_answer_loss must be on",
      False,
    )


@dataclasses.dataclass(frozen=True)
class Mesh:
  """Mesh axis sizes; -1 on at most one axis = the remaining devices."""

  data: int = field(-1, "Data-parallel axis.")
  fsdp: int = field(1, "FSDP axis.")
  tensor: int = field(1, "Tensor-parallel axis.")


@dataclasses.dataclass(frozen=True)
class Sharding:
  rules: Pairs = field((), "(logical name, mesh axis | None | axes) pairs; () = built-in rules.")


@dataclasses.dataclass(frozen=True)
class Distributed:
  initialize: str = field("auto", "jax.distributed.initialize: auto | true | false.")
  coordinator_address: str = field("", "host:port of process 0; '' = auto.")
  num_processes: int = field(1, "Processes in the job.")
  process_id: int = field(0, "This process's index.")


@dataclasses.dataclass(frozen=True)
class Run:
  """A whole run."""

  seed: int = field(0, "Run seed.")
  method: str = field("colar", "Training method (see the methods registry).")
  init_from: str = field("", "Workdir or step dir of a previous run (e.g. CoT for CoLaR).")
  model: Model = field(Model(), "Model.")
  data: Data = field(Data(), "Data.")
  colar: Colar = field(Colar(), "CoLaR SFT.")
  baselines: Baselines = field(Baselines(), "Table-1 baselines.")
  optim: Optim = field(Optim(), "SFT optimizer.")
  train: Train = field(Train(), "SFT loop.")
  rollout: Rollout = field(Rollout(), "Latent rollout / sampling.")
  rl: RL = field(RL(), "Stage 2: GRPO.")
  mesh: Mesh = field(Mesh(), "Device mesh.")
  sharding: Sharding = field(Sharding(), "Logical-axis sharding rules.")
  distributed: Distributed = field(Distributed(), "Multi-process set-up.")
  jax_cache_dir: str = field("~/.cache/colar_jax/jax", "Persistent compilation cache; '' = off.")


MODEL_PRESETS: dict[str, Arch] = {
  # Random-init model for CPU runs and tests.
  "tiny": Arch(),
  # HuggingFaceTB/SmolLM2-135M-Instruct.
  "smollm2_135m": Arch(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_embeddings=True,
  ),
  # meta-llama/Llama-3.2-1B-Instruct.
  "llama32_1b": Arch(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_embeddings=True,
    rope_scaling=(
      ("factor", 32.0),
      ("high_freq_factor", 4.0),
      ("low_freq_factor", 1.0),
      ("original_max_position_embeddings", 8192),
      ("rope_type", "llama3"),
    ),
  ),
  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2 architecture).
  "qwen2_1p5b": Arch(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_embeddings=False,
    qkv_bias=True,
    model_type="qwen2",
  ),
}
