"""The embedded CPU demo (``make demo``), one config per phase.

``--config=configs/demo.py:PHASE`` with PHASE one of ``cot | colar | rl | nocot |
coconut`` (the order ``python -m colar_jax.demo`` runs them in). Rerun one phase by
hand, e.g.::

  python -m colar_jax.train_sft --config=configs/demo.py:colar --workdir=runs/demo/colar
  python -m colar_jax.train_rl  --config=configs/demo.py:rl    --workdir=runs/demo/rl

Every phase trains the ``tiny`` preset (random init, char tokenizer) on the synthetic
modular-arithmetic chain task (``colar_jax/data/synthetic.py``); its data lives in
``<workdir>/../data``, shared by all phases. ``init_from`` defaults to the sibling phase
under ``runs/demo/`` (the demo sets it to ``<its workdir>/<phase>``).

Why these settings (measured figures: BUILD_NOTES.md, "Demo"):
  * short prompt templates (``x=2;x*3;x-2;x-8;x-7? c=2###``): the reference's English
    boiler-plate is ~55 characters that a char-level model must attend over at every
    step for nothing; here the question part fits the 32-token bucket;
  * 4 steps of ``a op b=c`` joined by one ``\\n``: the CoT chain is 23 tokens, a CoLaR-c
    latent covers c of them, so #L ratios are ~1/c by construction;
  * all phases but RL start from the CoT run (as the paper: CoLaR and the baselines are
    fine-tuned from the CoT SFT model; RL from CoLaR SFT).
"""

from __future__ import annotations

from colar_jax import configlib

PHASES = ("cot", "colar", "rl", "nocot", "coconut")
# Which entry point trains a phase and which phase it starts from ("" = random init).
TRAINER = dict(cot="train_sft", colar="train_sft", rl="train_rl", nocot="train_sft",
               coconut="train_sft")
INIT_FROM = dict(cot="", colar="cot", rl="colar", nocot="cot", coconut="cot")
DESCRIPTION = dict(cot="CoT SFT from random init", colar="CoLaR SFT (latent head + compressed chain)",
                   rl="GRPO over the latent policy", nocot="No-CoT baseline (answer only)",
                   coconut="Coconut baseline (continuous thoughts, staged curriculum)")
DEFAULT_ROOT = "runs/demo"
TARGETS = True  # colar_jax.demo checks the demo's accuracy / #L targets


def eval_settings(quick: bool = False) -> dict:
  """What ``python -m colar_jax.demo`` evaluates (test split; 0 = every question)."""
  if quick:
    return dict(factors=(1, 2), seeds=2, test_examples=16)
  return dict(factors=(1, 2, 3, 5), seeds=3, test_examples=0)


def _common():
  c = configlib.base_config()
  configlib.apply_model_preset(c, "tiny")
  c.seed = 0
  # Data: the synthetic task (see colar_jax/data/synthetic.py), compact templates.
  c.data.dataset = "synthetic"
  c.data.synthetic = dict(num_steps=4, modulus=10, train_size=20000, val_size=500,
                          test_size=500, seed=1234)
  c.data.question_template = "{}"
  c.data.speed_template = " c={}"
  c.data.answer_template = "A:{}"
  c.data.question_buckets = (24, 32)
  c.data.steps_buckets = (24, 32)
  c.data.answer_buckets = (8, 16)
  c.data.batch_size = 64
  c.data.eval_batch_size = 250
  # Optimiser: small model, from scratch.
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20
  # Logging / checkpoints: one save at the end (the demo reuses finished runs).
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.eval_examples = 200
  c.train.ckpt_every = 100000
  c.train.keep_last = 1
  c.train.keep_best = 0
  c.train.monitor = "val/loss"
  # Decoding: the CoT answer holds the whole chain (23 tokens + ###Answer:d + EOS).
  c.rollout.max_latent_steps = 32
  c.rollout.max_new_tokens = 40
  return c


def _quick(c, phase: str) -> None:
  """A few steps per phase and a smaller task: plumbing checks (tests), meaningless numbers."""
  arch = c.model.arch  # a smaller model: compile time dominates a quick run
  arch.hidden_size, arch.intermediate_size, arch.num_layers = 32, 64, 1
  arch.num_heads, arch.num_kv_heads, arch.head_dim = 2, 1, 16
  c.data.synthetic.train_size = 256
  c.data.synthetic.val_size = 16
  c.data.synthetic.test_size = 16
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.train.num_steps = dict(cot=4, colar=4, rl=2, nocot=2, coconut=4)[phase]
  c.train.log_every = 1
  if phase in ("colar", "rl"):
    c.colar.max_compression_factor = "1,2"
  if phase == "rl":
    c.rl.compression_factor = 2
    c.rl.questions_per_step = 2
    c.rl.group_size = 4
    c.rl.exp_batch_size = 8
  if phase == "coconut":
    c.baselines.coconut.epochs_per_stage = 1  # 256 / 8 = 32 batches per epoch: stage 1 only


def get_config(arg: str = "cot"):
  parts = [p.strip() for p in (arg or "cot").split(",") if p.strip()]
  phase, quick = (parts or ["cot"])[0], "quick" in parts[1:]
  if phase not in PHASES:
    raise ValueError(f"configs/demo.py: unknown phase {phase!r}; known: {', '.join(PHASES)}")
  c = _common()
  src = INIT_FROM[phase]
  c.init_from = f"{DEFAULT_ROOT}/{src}" if src else ""
  if phase == "cot":
    c.method = "cot"
    c.train.num_steps = 600
  elif phase == "colar":
    c.method = "colar"
    c.colar.max_compression_factor = "5"
    c.train.num_steps = 600
    c.optim.lr = 5e-4
  elif phase == "rl":
    c.method = "colar"
    c.colar.max_compression_factor = "5"
    c.train.num_steps = 30
    c.rl.compression_factor = 5
    c.rl.questions_per_step = 16
    c.rl.group_size = 8
    c.rl.exp_batch_size = 64
    c.rl.lr = 1e-4
    c.rl.punish_latent_length = True
    c.rl.eval_at_start = False
  elif phase == "nocot":
    c.method = "nocot"
    c.train.num_steps = 300
  elif phase == "coconut":
    c.method = "coconut"
    c.train.num_steps = 300
  if quick:
    _quick(c, phase)
  return configlib.finalize(c)
