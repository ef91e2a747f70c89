"""The embedded CPU demo (``make demo``), one config per phase.

``--config=configs/demo.py:PHASE`` with PHASE one of ``cot | colar | rl | nocot |
icot | coconut | distill`` (the order ``python -m colar_jax demo`` runs them in). Rerun one phase by
hand, e.g.::

  python -m colar_jax sft --config=configs/demo.py:colar --workdir=runs/demo/colar
  python -m colar_jax rl  --config=configs/demo.py:rl    --workdir=runs/demo/rl

Every phase trains a narrowed ``tiny`` preset (random init, char tokenizer) on the synthetic
modular-arithmetic chain task (``colar_jax/data/synthetic.py``); its data lives in
``<workdir>/../data``, shared by all phases. ``init_from`` defaults to the sibling phase
under ``runs/demo/`` (the demo sets it to ``<its workdir>/<phase>``).

Why these settings (the runs and numbers behind each are in BUILD_NOTES, "Embedded
default"):
  * task: 4 steps of ``a op b=c`` mod 10, operands 1..9, operators ``+`` and ``*`` only:
    a compressed block is a SUM of c token embeddings (a bag), which cannot tell ``6-2``
    from ``2-6``.
  * every step ends with ``\n`` (``2*3=6\n``, a 6-token period that c=2 and c=3 divide,
    so their latents cut every step at the same places), and 3 in 4 chains end with two
    redundant steps restating the value (``1=1\n1=1\n``, 8 tokens): reasoning a shorter
    chain can drop, where the stop is the end-of-thinking token draw, so GRPO's length
    reward has a real choice (at c=5 the SFT model thinks 7 latents, GRPO learns that 5
    hold the chain). The tail is long and frequent so that GRPO's room (2 of 7 latents at
    c=5) does not depend on how often one SFT run happens to stop early: with one 4-token
    step on half the chains it was at most 16.7%, and 7-16% over 3 seeds (BUILD_NOTES).
  * ``colar.end_latent_loss=False``: the latent head is not trained at a chain's last
    position (inference never uses that prediction); trained there, it learns a blend of
    the separator's embedding and the tail, and rollouts that go on are fed the blend.
  * short templates (``x=2;x*3;x+2;x*8;x+7? c=2###``, answer ``###A:9``): the
    reference's English boiler-plate is characters a char-level model attends over at
    every step for nothing.
  * model d=64, 2 layers (0.1M params), batch 16, AdamW 2e-3: on 2 cores the bottleneck
    is the NUMBER of updates (the latent head must become precise enough that its own
    predictions do not drift).
  * CoLaR and the four baselines (No-CoT, iCoT, Coconut, Distill) start from the CoT
    run (as the paper's CoLaR; for the baselines it is the strongest start this budget
    allows), GRPO (answer-part policy loss, at c=5) from CoLaR.
"""

from __future__ import annotations

from colar_jax import config

PHASES = ("cot", "colar", "rl", "nocot", "icot", "coconut", "distill")
# Which entry point trains a phase and which phase it starts from ("" = random init).
TRAINER = {p: ("rl" if p == "rl" else "sft") for p in PHASES}
INIT_FROM = dict(
  cot="", colar="cot", rl="colar", nocot="cot", icot="cot", coconut="cot", distill="cot"
)
DESCRIPTION = dict(
  cot="CoT SFT from random init",
  colar="CoLaR SFT (latent head + compressed chain)",
  rl="GRPO over the latent policy",
  nocot="No-CoT baseline (answer only)",
  icot="iCoT baseline (steps internalised one by one)",
  coconut="Coconut baseline (continuous thoughts, staged curriculum)",
  distill="Distill baseline (CODI: student thoughts distilled from the CoT teacher)",
)
DEFAULT_ROOT = "runs/demo"
TARGETS = True  # the demo command checks the demo's accuracy / #L targets


def eval_settings(quick: bool = False) -> dict:
  """What ``python -m colar_jax demo`` evaluates (test split; 0 = every question)."""
  if quick:
    return dict(factors=(1, 2), seeds=2, test_examples=16)
  return dict(factors=(1, 2, 3, 4, 5), seeds=3, test_examples=0)


def _common():
  c = config.apply_preset(config.base_config(), "tiny")
  # A narrower, shallower Llama than the tiny preset (d=64, 2 layers, 0.1M params): on
  # 2 CPU cores the demo is bound by the NUMBER of optimizer steps (CoLaR's latent head
  # must become precise), and a 3x cheaper step buys 3x more of them.
  arch = c.model.arch
  arch.hidden_size, arch.intermediate_size, arch.num_layers = 64, 256, 2
  arch.num_heads, arch.num_kv_heads, arch.head_dim = 4, 2, 16
  c.seed = 0
  # Data: the synthetic task (colar_jax/data/synthetic.py) with commutative operators
  # only, so a compressed block (a SUM of c token embeddings) determines its step's
  # result whatever the order inside it ("6-2" and "2-6" would give the same latent).
  c.data.dataset = "synthetic"
  # Two redundant "1=1" steps on 75% of the chains, none on the rest (see the docstring).
  syn = c.data.synthetic
  syn.min_steps = syn.max_steps = 4
  syn.operators, syn.modulus, syn.seed = "+*", 10, 1234
  syn.min_noop_steps = syn.max_noop_steps = 2
  syn.noop_percent = 75
  syn.train_size, syn.val_size, syn.test_size = 20000, 500, 500
  c.data.question_template = "{}"
  c.data.speed_template = " c={}"
  c.data.answer_template = "A:{}"
  # Every step ends with "\n": a 6-token period ("2*3=6\n") that c=2 and c=3 divide, so
  # their latents cut every step at the same places (with 5-token steps c=2/3 drifted
  # off the chain at inference unless trained on their own predictions, 1.6x the cost).
  # The trailing one after the last step makes the real chain 24 tokens, 12 c=2 blocks
  # (32 with the redundant tail).
  c.data.step_joiner = "\n"
  c.data.steps_template = "{}\n"
  c.data.question_buckets = (24, 32)
  c.data.steps_buckets = (40,)  # "###" + 24 or 32 chain tokens
  c.data.answer_buckets = (8, 16)
  c.data.batch_size = 16
  c.data.eval_batch_size = 500
  # Optimiser: from scratch, many small steps.
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 20
  c.optim.grad_clip = 1.0  # what the demo was tuned with (the reference SFT does not clip)
  # Logging / checkpoints: one save at the end (the demo reuses finished runs).
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.eval_examples = 200
  c.train.ckpt_every = 100000
  c.train.keep_last = 1
  c.train.keep_best = 0
  c.train.monitor = "val/loss"
  # Decoding: a CoT answer holds the whole chain (<= 32 tokens, then ###A:d and EOS).
  c.rollout.max_latent_steps = 40
  c.rollout.max_new_tokens = 48
  return c


def _quick(c, phase: str) -> None:
  """A few steps per phase and a smaller task: plumbing checks (tests), meaningless numbers."""
  arch = c.model.arch  # an even smaller model: compile time dominates a quick run
  arch.hidden_size, arch.intermediate_size, arch.num_layers = 32, 64, 1
  arch.num_heads, arch.num_kv_heads, arch.head_dim = 2, 1, 16
  c.data.synthetic.train_size = 256
  c.data.synthetic.val_size = 16
  c.data.synthetic.test_size = 16
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.train.num_steps = dict(cot=4, colar=4, rl=2, nocot=2, icot=4, coconut=4, distill=2)[phase]
  c.rl.num_steps = 2
  c.train.log_every = 1
  if phase in ("colar", "rl"):
    c.colar.factors = (1, 2)
    c.colar.factor_weights = ()
  if phase == "rl":
    c.rl.compression_factor = 2
    c.rl.questions_per_step = 2
    c.rl.group_size = 4
    c.rl.exp_batch_size = 8
  # coconut / icot: 256 / 8 = 32 batches per epoch, so 4 steps stay at stage 1.
  if phase in ("icot", "coconut"):
    c.data.synthetic.train_size = 256


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
    # The loss drops in a late phase transition whose step depends on the init: seed 0
    # was at 74% test accuracy at step 1,200 (arithmetic slips such as "9+4=5") and at
    # 100% at 2,000 (BUILD_NOTES, "Embedded default").
    c.train.num_steps = 2000
  elif phase in ("colar", "rl"):
    c.method = "colar"
    # The evaluated factors 1..5, one drawn per batch in proportion 1 : 1 : 1 : 3 : 6
    # (c=5 in 6 of 12 batches): a latent that holds most of a step (c=4, 5) needs far
    # more updates (c=5 alone reaches 86%; drawn uniformly 31-39% in the old budget);
    # c=3 divides the 6-token step and learns fastest; c=1 and c=2 below ~450 / ~500
    # updates landed anywhere in 82-98% (BUILD_NOTES, "Embedded default", runs a-e).
    c.colar.factors = (1, 2, 3, 4, 5)
    c.colar.factor_weights = (1.0, 1.0, 1.0, 3.0, 6.0)
    c.colar.end_latent_loss = False  # see the docstring
    # The latent scale: std of the CoT run's TRAINED embedding matrix (the reference
    # hard-codes it per pretrained model). A from-scratch CoT run measures ~0.11; its
    # init-time value (~0.02), which init_from would inherit, inflates the normalised
    # latent targets ~5x and the latent MSE then swamps the CE.
    c.model.embed_std = 0.11
    c.rollout.max_new_tokens = 8  # "A:d" + EOS after the separator
    if phase == "colar":
      # 10,000 steps (~5 min idle): at 5,000 the factors shared too few updates and c=4/5
      # landed anywhere in 81-99% by CoT run (BUILD_NOTES, "Embedded default", run f10k).
      c.train.num_steps = 10000
      # Constant 2e-3 and an EMA of the weights (horizon ~1,000 updates), with c=4/5
      # drawn 9 batches in 12: the last iterate of a cosine run was good at a different
      # factor per seed (seed 1: 89.8 / 100 / 88.2 / 92.0 / 89.4 at c = 1..5); the
      # average of the constant-lr run is 98.8 / 99.2 / 100 / 99.8 / 100 (its iterate
      # 95.4 / 92.6 / 95.4 / 84.6 / 74.6 at the old weights; BUILD_NOTES, session 17).
      c.optim.schedule = "constant"
      c.optim.ema_decay = 0.999
    else:
      # GRPO at c=5. The SFT model thinks 7 latents on (nearly) every question, though
      # the 24-token chain of a quarter of them fits in 5: every sample of a group is
      # right, so the length-aware reward (correct / #L) alone separates the ones that
      # stop after the 5th latent, and GRPO learns to stop there (BUILD_NOTES).
      c.rl.num_steps = 40
      c.rl.compression_factor = 5
      c.rl.questions_per_step = 16
      c.rl.group_size = 8
      c.rl.exp_batch_size = 64
      # The policy loss on the answer part only (the end-of-thinking draw and the
      # answer tokens; the reference's switch). The latent head's std collapses to
      # ~0.005 in SFT, so the latents' log-ratios are huge and noisy (grad norm 140-310,
      # half of them clipped) and drown the stop decision: with the latent part on, #L
      # stayed at 5.92 (run g8) and at c=2 moved -1.2% of a possible 7.9% (g2).
      c.rl.use_latent_loss = False
      # Exploration: the end-of-thinking token drawn at temperature 2 in GRPO's rollouts
      # (log-probs and evaluation untempered). An SFT run that almost never stops after
      # the 5th latent (~1 sample in 128) gives GRPO's groups no shorter sample: #L 7.00
      # -> 6.98 at T=1, 7.00 -> 5.28 at T=2 (seed 0, BUILD_NOTES).
      c.rl.explore_eot_temperature = 2.0
      # GRPO's optimizer: the SFT settings of the demo (no decay, 20 warm-up updates) at
      # 5e-5 (1e-4 lost 0.9 points at c=5 and 3.7 at c=3; 1e-3 / 3e-4 lost 82 / 19 on the
      # one-step tail).
      c.rl.optim.lr = 5e-5
      c.rl.optim.weight_decay = 0.0
      c.rl.optim.warmup_steps = 20
      c.rl.punish_latent_length = True
      c.rl.eval_at_start = False
      # Per-token mean, what the demo was tuned with (the reference: a sum / 32).
      c.rl.average_per_token = True
  elif phase == "nocot":
    c.method = "nocot"
    c.train.num_steps = 300
    # Its prompt ("x=..?") padded like CoT's, same decoding budget: evaluation reuses
    # CoT's compiled rollout (same shapes and settings).
    c.data.question_buckets = (32,)
  elif phase == "icot":
    c.method = "icot"
    # iCoT removes the first s steps at stage s, all of them at max_stage: 5 stages (4
    # real steps, then the whole tail) one epoch each over a 1,600-problem split (100 batches),
    # then the final (No-CoT-like) stage for the rest of the budget.
    c.data.synthetic.train_size = 1600
    cur = c.baselines.icot
    cur.epochs_per_stage, cur.start_stage, cur.max_stage = 1, 1, 5
    c.train.num_steps = 800
    c.data.question_buckets = (32,)  # No-CoT's prompt, CoT's decoding
  elif phase == "distill":
    c.method = "distill"
    # CODI: a CoT teacher and a 6-thought student in one model, from the CoT run.
    c.train.num_steps = 600
    c.rollout.max_new_tokens = 8
  elif phase == "coconut":
    c.method = "coconut"
    # Coconut's curriculum advances per EPOCH (reference: 3 epochs per stage); on a
    # 1,600-problem train split of the same generator (the test split does not depend
    # on train_size), 100 steps per stage: one thought replaces one more step per stage
    # (4 real steps, then the whole tail), the final stage (5 thoughts) gets the last 200.
    # With 3 stages of 2 thoughts and 300 steps it stayed below No-CoT (13.0%).
    c.data.synthetic.train_size = 1600
    cur = c.baselines.coconut.curriculum
    cur.epochs_per_stage, cur.start_stage, cur.max_stage = 1, 1, 5
    c.baselines.coconut.n_latents_per_step = 1
    c.train.num_steps = 600
    c.rollout.max_new_tokens = 8
  if quick:
    _quick(c, phase)
  return c
