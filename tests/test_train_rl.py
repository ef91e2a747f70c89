"""GRPO trainer: sampler/trainer log-prob agreement, rewards, zero-advantage gradient,
learning on contrived rewards, and the full RL run (checkpoint, resume, CLI).

Two kinds of tests, both tiny (8 fake CPU devices, batch sharded over them):

* library level (``train.rl.step``): a random 2-layer model whose LM-head column
  of the separator is rescaled so rows stop thinking at varied steps. Rewards are
  CONTRIVED (no tokenizer): "correct" = the first answer token lies in a
  per-question set of 8 of the 32 tokens; with the length penalty the reward is
  correct / #L. A short RL run must raise the reward and lower (never raise) #L.
* system level (``train.rl.loop.train`` and ``python -m colar_jax rl``): a CoLaR-SFT
  checkpoint of a tiny model trained for 2 steps (session fixture). It has no accuracy to speak
  of -- a real accuracy gain needs thousands of SFT steps, minutes on these CPUs
  -- so this part checks the plumbing (metrics, logprob_gap, KL, checkpoints,
  exact resume), not learning.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from colar_jax import config
from colar_jax.decode.rollout import RolloutConfig
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.train import hooks
from colar_jax.train import logs as metrics
from colar_jax.train import run as trun
from colar_jax.train import sft as train_sft
from colar_jax.train import state as ts
from colar_jax.train.rl import loop as train_rl
from colar_jax.train.rl import step as rlx
from colar_jax.weights import checkpoints as checkpointing

CFG = ModelConfig(
  vocab_size=32,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=128,
  tie_embeddings=False,
)
SEP, EOS, P, N_Q, G = 5, 2, 8, 4, 8
RC = RolloutConfig(
  separator_id=SEP, eos_id=EOS, max_latent_steps=6, max_new_tokens=3, embed_std=0.02
)
RL = rlx.RLConfig(group_size=G, exp_batch_size=16, punish_latent_length=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Lib:
  """Model, mesh, prompts and the compiled update shared by the library tests."""

  def __init__(self) -> None:
    self.mesh = shd.make_mesh(config.Mesh(data=-1, fsdp=1, tensor=1))
    self.rules = shd.DEFAULT_RULES
    model = shd.create_sharded(lambda: CoLaRModel(CFG, rngs=nnx.Rngs(0)), self.mesh, self.rules)
    u = jax.random.normal(jax.random.key(3), (CFG.hidden_size,))
    k = model.lm.lm_head.kernel[...]
    model.lm.lm_head.kernel[...] = k.at[:, SEP].set(3.0 * u / jnp.linalg.norm(u))
    self.graphdef, p_state, self.frozen = nnx.split(model, ts.trainable_filter(False), ...)
    self.params = nnx.to_pure_dict(p_state)
    optim = config.Optim(
      lr=1e-3,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      warmup_steps=0,
      schedule="constant",
      grad_clip=1.0,
      grad_accum=1,
    )
    self.tx = ts.make_optimizer(optim, 100)
    self.shardings = ts.state_shardings(
      self.tx, self.params, ts.param_shardings(p_state, self.mesh, self.rules), self.mesh
    )
    self.update = rlx.compile_update(
      self.graphdef, self.tx, RL, RC, self.shardings, self.mesh, self.rules
    )
    rng = np.random.default_rng(0)
    q = rng.integers(6, CFG.vocab_size, (N_Q, P)).astype(np.int32)
    ids, mask = rlx.repeat_groups(q, np.ones_like(q), G)
    b = ts.put_batch({"ids": ids, "mask": mask}, self.mesh, self.rules)
    self.ids, self.mask = b["ids"], b["mask"]
    # Contrived "gold": per question, 8 of the 32 tokens count as a correct answer.
    self.gold = np.stack([rng.permutation(CFG.vocab_size)[:8] for _ in range(N_Q)])

  def state(self) -> ts.TrainState:
    return ts.init_train_state(self.params, self.tx, 0, self.shardings)

  def rollout(self, params: Any, seed: int):
    return rlx.rollout_group(
      self.graphdef, params, self.frozen, self.ids, self.mask, jax.random.key(seed), RC
    )

  def correct(self, out) -> np.ndarray:
    first = np.asarray(jax.device_get(out.answer_ids))[:, 0]
    return np.array([first[i] in self.gold[i // G] for i in range(N_Q * G)], np.float32)

  def experience(self, out, adv: np.ndarray) -> rlx.Experience:
    a = ts.put_batch({"adv": adv.astype(np.float32)}, self.mesh, self.rules)["adv"]
    return rlx.make_experience(self.ids, self.mask, out, a)

  def stats(self, params: Any, seeds=range(100, 104)) -> tuple[float, float, float]:
    """(mean reward, accuracy, #L) over fixed rollout seeds."""
    r, acc, nl = [], [], []
    for s in seeds:
      out = self.rollout(params, s)
      n = np.asarray(jax.device_get(out.num_latents))
      c = self.correct(out)
      r.append(np.mean(c / n))
      acc.append(c.mean())
      nl.append(n.mean())
    return float(np.mean(r)), float(np.mean(acc)), float(np.mean(nl))

  def run(self, steps: int, correct_fn) -> tuple[ts.TrainState, list[dict[str, float]]]:
    state, log = self.state(), []
    for step in range(steps):
      out = self.rollout(state.params, 1000 + step)
      n_lat = np.asarray(jax.device_get(out.num_latents))
      _, adv = rlx.rewards_and_advantages(correct_fn(out), n_lat, RL)
      exp = self.experience(out, adv)
      ms = []
      for idx in rlx.minibatch_order(N_Q * G, RL, (0, step)):
        state, m = self.update(state, self.frozen, exp, rlx.replicated(self.mesh, idx))
        ms.append(m)
      log.append({k: float(v) for k, v in jax.device_get(ms[0]).items()})
    return state, log


@pytest.fixture(scope="module")
def lib() -> Lib:
  return Lib()


@functools.cache
def loss_grad_fn(lib: Lib, rl: rlx.RLConfig) -> Any:
  """Jitted ``(params, mini-batch) -> d rl_loss / d params`` (one compile per ``rl``)."""

  def f(params, mb):
    return rlx.rl_loss(ts.merge_model(lib.graphdef, params, lib.frozen), mb, rl, RC)[0]

  return jax.jit(jax.grad(f))


def test_trainer_logprobs_equal_rollout_logprobs(lib: Lib) -> None:
  """logprob_gap of the first update (same params as the rollout) is ~0; it is not
  trivially 0: perturbed params give a large gap."""
  out = lib.rollout(lib.params, 0)
  n = np.asarray(jax.device_get(out.num_latents))
  assert len(set(n.tolist())) >= 3, n  # varied chain lengths: a real test of masking
  adv = np.random.default_rng(1).normal(size=N_Q * G)
  exp = lib.experience(out, adv)
  idx = rlx.minibatch_order(N_Q * G, RL, (0, 0))[0]
  _, m = lib.update(lib.state(), lib.frozen, exp, rlx.replicated(lib.mesh, idx))
  gap = float(m["logprob_gap"])
  print("logprob_gap", gap)
  assert gap <= 1e-4 and bool(m["finite"])
  noisy = jax.tree.map(lambda p: p * 1.05, lib.params)
  model = ts.merge_model(lib.graphdef, noisy, lib.frozen)
  _, m2 = rlx.rl_loss(model, rlx.take_rows(exp, jnp.asarray(idx)), RL, RC)
  assert float(m2["logprob_gap"]) > 1e-3


def test_exploration_temperature_changes_the_draws_not_the_logprobs(lib: Lib) -> None:
  """``rl.explore_eot_temperature``: tempered end-of-thinking draws stop elsewhere than
  T=1 draws with the same key, and their log-probs stay the untempered policy's (as the
  reference's, for every temperature), so the trainer reproduces them (gap ~0)."""
  hot = dataclasses.replace(RC, eot_temperature=3.0)
  out = rlx.rollout_group(
    lib.graphdef, lib.params, lib.frozen, lib.ids, lib.mask, jax.random.key(7), hot
  )
  mb = rlx.take_rows(lib.experience(out, np.ones(N_Q * G)), jnp.arange(16))
  model = ts.merge_model(lib.graphdef, lib.params, lib.frozen)
  assert float(rlx.rl_loss(model, mb, RL, hot)[1]["logprob_gap"]) <= 1e-4
  # Tempered draws stop at other places than T=1 draws with the same key.
  cold = rlx.rollout_group(
    lib.graphdef, lib.params, lib.frozen, lib.ids, lib.mask, jax.random.key(7), RC
  )
  assert not np.array_equal(jax.device_get(out.num_latents), jax.device_get(cold.num_latents))


def test_length_penalty_reward_in_experience(lib: Lib) -> None:
  out = lib.rollout(lib.params, 1)
  n = np.asarray(jax.device_get(out.num_latents))
  correct = lib.correct(out)
  r, adv = rlx.rewards_and_advantages(correct, n, RL)
  np.testing.assert_allclose(r, correct / n, rtol=1e-6)
  rg = r.reshape(N_Q, G)
  want = (rg - rg.mean(1, keepdims=True)) / (rg.std(1, ddof=1, keepdims=True) + 1e-8)
  np.testing.assert_allclose(adv, want.reshape(-1), rtol=1e-4, atol=1e-6)
  r0, _ = rlx.rewards_and_advantages(correct, n, rlx.RLConfig(group_size=G))
  np.testing.assert_array_equal(r0, correct)  # no penalty: plain 1/0


def test_zero_advantages_give_zero_gradient(lib: Lib) -> None:
  out = lib.rollout(lib.params, 2)
  idx = jnp.arange(16)

  def grads(adv: np.ndarray):
    mb = rlx.take_rows(lib.experience(out, adv), idx)
    return jax.device_get(loss_grad_fn(lib, RL)(lib.params, mb))

  zero = jax.tree.leaves(grads(np.zeros(N_Q * G)))
  assert all(np.all(g == 0) for g in zero)
  some = jax.tree.leaves(grads(np.linspace(-1, 1, N_Q * G)))
  assert any(np.abs(g).max() > 0 for g in some)


def test_answer_only_loss_leaves_the_latent_head_alone(lib: Lib) -> None:
  """``use_latent_loss=False`` (the demo's GRPO): the latents are inputs of the scored
  sequence, so only the latent part reaches the latent head; the decoder still learns."""
  out = lib.rollout(lib.params, 3)
  mb = rlx.take_rows(lib.experience(out, np.linspace(-1, 1, N_Q * G)), jnp.arange(16))

  def grads(rl):
    g = jax.device_get(loss_grad_fn(lib, rl)(lib.params, mb))
    flat = jax.tree_util.tree_flatten_with_path(g)[0]
    head = [np.abs(x).max() for k, x in flat if "latent_head" in jax.tree_util.keystr(k)]
    rest = [np.abs(x).max() for k, x in flat if "latent_head" not in jax.tree_util.keystr(k)]
    assert head and rest
    return max(head), max(rest)

  head, rest = grads(dataclasses.replace(RL, use_latent_loss=False))
  assert head == 0 and rest > 0
  head_both, _ = grads(RL)
  assert head_both > 0


def test_nan_guard_skips_the_update(lib: Lib) -> None:
  out = lib.rollout(lib.params, 3)
  adv = np.ones(N_Q * G)
  adv[5] = np.nan
  state = lib.state()
  before = jax.device_get(state.params)
  idx = rlx.replicated(lib.mesh, np.arange(16, dtype=np.int32))
  state, m = lib.update(state, lib.frozen, lib.experience(out, adv), idx)
  assert not bool(m["finite"]) and int(state.nonfinite_step) == 0
  state, m = lib.update(state, lib.frozen, lib.experience(out, np.ones(N_Q * G)), idx)
  assert not bool(m["finite"])  # sticky: nothing is applied after the first bad update
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def test_rl_with_length_penalty_shortens_latent_chains(lib: Lib) -> None:
  """Reward depends on #L only (always "correct", reward = 1/#L): #L must drop."""
  r0, _, l0 = lib.stats(lib.params)
  state, log = lib.run(8, lambda out: np.ones(N_Q * G, np.float32))
  r1, _, l1 = lib.stats(state.params)
  print(f"length-only reward: {r0:.3f} -> {r1:.3f}, #L {l0:.2f} -> {l1:.2f}")
  assert l1 < l0 - 1.0 and r1 > r0
  assert max(m["logprob_gap"] for m in log) <= 1e-4


def test_rl_raises_reward_without_raising_latent_length(lib: Lib) -> None:
  """Reward = contrived correctness / #L: the mean reward on fixed seeds rises, #L does
  not."""
  r0, a0, l0 = lib.stats(lib.params)
  state, log = lib.run(16, lib.correct)
  r1, a1, l1 = lib.stats(state.params)
  print(f"reward {r0:.3f} -> {r1:.3f}, accuracy {a0:.3f} -> {a1:.3f}, #L {l0:.2f} -> {l1:.2f}")
  assert r1 > 1.5 * r0 and a1 > a0 + 0.1
  assert l1 <= l0 + 0.1
  assert all(m["finite"] for m in log)
  assert lib.update._cache_size() == 1  # one compilation for every update of the module


# ----------------------------------------------------------------------------- system
TINY_ARCH = dict(
  hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16
)


def _overrides(data_dir: str, **over: Any) -> dict[str, Any]:
  kv: dict[str, Any] = {
    "data.data_dir": data_dir,
    "data.synthetic.min_steps": 2,
    "data.synthetic.max_steps": 2,
    "data.synthetic.train_size": 64,
    "data.synthetic.val_size": 8,
    "data.synthetic.test_size": 8,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "train.eval_examples": 8,
    "train.progress": False,
    "train.keep_best": 0,
    "train.keep_last": 3,
    "colar.factors": (1,),
    "rollout.max_latent_steps": 4,
    "rollout.max_new_tokens": 6,
    "jax_cache_dir": os.path.join(REPO, ".cache", "jax_cache"),
  }
  kv.update({f"model.arch.{k}": v for k, v in TINY_ARCH.items()})
  kv.update(over)
  return kv


def _config(kv: dict[str, Any]) -> config.Run:
  """What ``--config=configs/base.py:tiny,colar --config.k=v`` builds, in process (the
  CLI's own ``config.load`` + ``config.apply_overrides`` path)."""
  c = config.load(os.path.join(REPO, "configs", "base.py") + ":tiny,colar")
  c.unlock()
  config.apply_overrides(c, [f"{k}={v}" for k, v in kv.items()])
  return config.from_config_dict(c)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> tuple[str, str]:
  """(data dir, workdir) of a 2-step CoLaR SFT run of a 1-layer model."""
  data_dir = str(tmp_path_factory.mktemp("rl_data"))
  wd = str(tmp_path_factory.mktemp("rl_sft"))
  train_sft.train(
    _config(
      _overrides(
        data_dir,
        **{
          "train.num_steps": 2,
          "train.eval_every": 0,
          "train.ckpt_every": 2,
          "train.monitor": "val/loss",
        },
      )
    ),
    wd,
  )
  return data_dir, wd


def _rl_overrides(sft: tuple[str, str], **over: Any) -> dict[str, Any]:
  data_dir, wd = sft
  return _overrides(
    data_dir,
    **{
      "init_from": wd,
      "rl.questions_per_step": 2,
      "rl.group_size": 8,
      "rl.exp_batch_size": 16,
      "rl.compression_factor": 1,
      "rl.optim.lr": 1e-3,
      "rl.punish_latent_length": True,
      "rl.kl_weight": 0.1,
      "train.eval_every": 2,
      "train.ckpt_every": 1,
      "train.log_every": 1,
      "train.monitor": "val/accuracy",
      **over,
    },
  )


def _parity(texts: list[str], golds: list[str]) -> np.ndarray:
  """Contrived reward (the 2-step SFT model is never right): even-length answers."""
  del golds
  return np.array([len(t) % 2 == 0 for t in texts], np.float32)


def test_train_rl_run_checkpoint_and_exact_resume(sft_run, tmp_path) -> None:
  ref_wd, wd = str(tmp_path / "straight"), str(tmp_path / "resumed")
  last = train_rl.train(
    _config(_rl_overrides(sft_run, **{"rl.num_steps": 3})), ref_wd, score_fn=_parity
  )
  ref = metrics.read_jsonl(ref_wd)
  assert [r["step"] for r in ref] == [1, 2, 3] and last["step"] == 3
  for r in ref:
    assert r["logprob_gap"] <= 1e-4, r
    for k in (
      "reward",
      "accuracy",
      "num_latent",
      "clip_frac_latent",
      "clip_frac_answer",
      "kl",
      "grad_norm",
      "loss",
      "zero_adv_groups",
    ):
      assert np.isfinite(r[k]), (k, r)
    assert 1.0 <= r["num_latent"] <= 4.0
  assert ref[0]["kl"] < 1e-3  # the policy starts AT the reference
  assert any(r["zero_adv_groups"] < 1 and r["answer_loss"] != 0 for r in ref)
  val = metrics.read_jsonl(ref_wd, "val")
  assert [v["step"] for v in val] == [0, 2, 3] and "val/accuracy" in val[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(ref_wd, "checkpoints")) if s.isdigit())
  assert steps == [1, 2, 3]
  # The RL checkpoint is a normal run: evaluation can load it.
  run = trun.load_run(ref_wd)
  assert run.method == "colar" and checkpointing.read_meta(ref_wd)["stage"] == "rl"
  assert run.run.rl.num_steps == 3 and run.run.rl.optim.lr == 1e-3
  # Stopped after 2 steps, resumed to 3: the same step-3 record.
  c2 = _rl_overrides(sft_run, **{"rl.num_steps": 2})
  train_rl.train(_config(c2), wd, score_fn=_parity)
  train_rl.train(_config(_rl_overrides(sft_run, **{"rl.num_steps": 3})), wd, score_fn=_parity)
  got = metrics.read_jsonl(wd)
  assert [r["step"] for r in got] == [1, 2, 3]
  for k in (
    "reward",
    "accuracy",
    "num_latent",
    "loss",
    "grad_norm",
    "logprob_gap",
    "answer_loss",
    "latent_loss",
    "kl",
  ):
    np.testing.assert_allclose(got[2][k], ref[2][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_nonfinite_reward_stops_without_checkpoint(sft_run, tmp_path) -> None:
  wd = str(tmp_path / "nan")
  c = _config(
    _rl_overrides(sft_run, **{"rl.num_steps": 2, "train.eval_every": 0, "rl.kl_weight": 0.0})
  )
  assert train_rl.NonFiniteLossError is hooks.NonFiniteLossError
  with pytest.raises(hooks.NonFiniteLossError, match="at RL step 1"):
    train_rl.train(c, wd, score_fn=lambda texts, golds: np.full(len(texts), np.nan))
  assert not os.path.exists(os.path.join(wd, "checkpoints", "1"))


def test_cli_one_step(sft_run, tmp_path) -> None:
  """The documented command line (real answer checking: this model scores 0), with an
  exploration temperature: the loop's experience is drawn with it and still scored with
  the untempered log-probs the rollout recorded (logprob_gap ~0)."""
  wd = str(tmp_path / "cli")
  kv = _rl_overrides(
    sft_run,
    **{
      "rl.num_steps": 1,
      "train.eval_every": 0,
      "rl.kl_weight": 0.0,
      "rl.explore_eot_temperature": 4.0,
      "rl.optim.ema_decay": 0.5,
    },
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "colar_jax",
      "rl",
      "--config=configs/base.py:tiny,colar",
      f"--workdir={wd}",
      *[f"--config.{k}={v}" for k, v in kv.items()],
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (rec,) = metrics.read_jsonl(wd)
  assert rec["step"] == 1 and rec["reward"] == 0.0 and rec["logprob_gap"] <= 1e-4
  assert os.path.isdir(os.path.join(wd, "checkpoints", "1"))
  assert trun.load_run(wd).run.rl.explore_eot_temperature == 4.0
  # With an average, the checkpoint's params are it and the iterate rides in "train".
  step_dir = os.path.join(wd, "checkpoints", "1")
  average = checkpointing._restore_item(step_dir, "params", ocp.args.StandardRestore())
  train = checkpointing._restore_item(step_dir, "train", ocp.args.StandardRestore())
  diff = [
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(train["iterate"]))
  ]
  assert max(diff) > 0, "the average equals the iterate"


def test_rl_config_is_validated(sft_run, tmp_path) -> None:
  c = _config(_rl_overrides(sft_run, **{"rl.exp_batch_size": 24}))
  with pytest.raises(ValueError, match="exp_batch_size"):
    train_rl.train(c, str(tmp_path / "bad"))
  # RLConfig is the config.RL section now: its ranges are checked with the whole run.
  assert rlx.RLConfig is config.RL
  bad = config.base_config()
  bad.rl.group_size = 1
  with pytest.raises(config.ConfigError, match=r"config\.rl\.group_size: must be >= 2"):
    config.from_config_dict(bad)
  bad.rl.group_size, bad.rl.use_latent_loss, bad.rl.use_answer_loss = 8, False, False
  with pytest.raises(config.ConfigError, match="use_answer_loss"):
    config.from_config_dict(bad)
