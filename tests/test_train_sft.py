"""SFT training system: step, LoRA, sharding, checkpoint resume, NaN guard, CLI (CPU, tiny)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh
from test_compression import sft_batch  # noqa: E402  (hand-made encode_sft_batch format)

from colar_jax import config
from colar_jax.methods.colar import ColarSettings
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.train import hooks
from colar_jax.train import logs as metrics
from colar_jax.train import run as trun
from colar_jax.train import sft as train_sft
from colar_jax.train import state as ts
from colar_jax.weights import checkpoints as checkpointing

TINY = ModelConfig(
  vocab_size=40,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)
TINY_ARCH = dict(
  hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optim_cfg(**kw: Any) -> config.Optim:
  d = dict(
    lr=1e-3,
    weight_decay=0.01,
    b1=0.9,
    b2=0.999,
    warmup_steps=0,
    schedule="constant",
    grad_clip=1.0,
    grad_accum=1,
  )
  d.update(kw)
  return config.Optim(**d)


def one_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)


def setup(model: CoLaRModel, mesh: Mesh, *, lora: bool = False, **optim: Any):
  """(graphdef, state, frozen, train_fn) for ``model`` placed on ``mesh``."""
  rules = shd.DEFAULT_RULES
  model = shd.shard_model(model, mesh, rules)
  graphdef, p_state, frozen = nnx.split(model, ts.trainable_filter(lora), ...)
  p_shard = ts.param_shardings(p_state, mesh, rules)
  params = nnx.to_pure_dict(p_state)
  oc = optim_cfg(**optim)
  tx = ts.make_optimizer(oc, 100)
  shardings = ts.state_shardings(tx, params, p_shard, mesh, ema=oc.ema_decay > 0)
  state = ts.init_train_state(params, tx, 0, shardings)
  # CoLaR's loss settings (colar section defaults, embed_std 0.02); CoT ignores them.
  settings = ColarSettings(embed_std=0.02)
  train_fn, _ = ts.compile_steps(graphdef, tx, settings, shardings, oc.ema_decay)
  return graphdef, state, frozen, train_fn


def host_params(state: ts.TrainState) -> dict:
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_loss_decreases_over_50_steps() -> None:
  mesh = one_device_mesh()
  _, state, frozen, step = setup(CoLaRModel(TINY, rngs=nnx.Rngs(0)), mesh)
  batch = ts.put_batch(sft_batch(np.random.default_rng(0)), mesh, shd.DEFAULT_RULES)
  losses = []
  for _ in range(50):
    state, m = step(state, frozen, batch, method="colar", c=2)
    losses.append(m)
  losses = [float(m["loss"]) for m in jax.device_get(losses)]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses[::10]
  assert int(state.step) == 50 and int(state.nonfinite_step) == -1
  assert step._cache_size() == 1  # one compile for this (bucket shapes, c)


def test_grad_accumulation_equals_one_big_step() -> None:
  """MultiSteps(k=2) over the same batch twice == one plain step (CoT: no sampling)."""
  mesh = one_device_mesh()
  model = CoLaRModel(TINY, rngs=nnx.Rngs(0))
  batch = ts.put_batch(sft_batch(np.random.default_rng(5)), mesh, shd.DEFAULT_RULES)
  _, plain, frozen, step1 = setup(model, mesh)
  plain, _ = step1(plain, frozen, batch, method="cot", c=1)
  _, accum, frozen2, step2 = setup(model, mesh, grad_accum=2)
  start = host_params(accum)
  accum, _ = step2(accum, frozen2, batch, method="cot", c=1)
  jax.tree.map(np.testing.assert_array_equal, start, host_params(accum))  # no update yet
  accum, _ = step2(accum, frozen2, batch, method="cot", c=1)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    host_params(plain),
    host_params(accum),
  )


def test_average_is_the_ema_of_the_updates() -> None:
  """``optim.ema_decay``: after each optimizer update n (1, 2, ...) the average is
  d_n * average + (1 - d_n) * params with d_n = min(d, (1 + n) / (10 + n)) (TF's
  ``ExponentialMovingAverage(num_updates)``), starting from the initial params; a
  micro-step of ``grad_accum`` that applies no update leaves it alone. The iterate
  trains exactly as without an average."""
  mesh = one_device_mesh()
  model = CoLaRModel(TINY, rngs=nnx.Rngs(0))
  batch = ts.put_batch(sft_batch(np.random.default_rng(6)), mesh, shd.DEFAULT_RULES)
  _, plain, frozen, step_plain = setup(model, mesh, grad_accum=2)
  _, avg, frozen2, step_avg = setup(model, mesh, grad_accum=2, ema_decay=0.5)
  expect = host_params(avg)
  jax.tree.map(np.testing.assert_array_equal, expect, jax.tree.map(np.asarray, avg.ema))
  n = 0
  for micro in range(6):
    plain, _ = step_plain(plain, frozen, batch, method="cot", c=1)
    avg, _ = step_avg(avg, frozen2, batch, method="cot", c=1)
    jax.tree.map(np.testing.assert_array_equal, host_params(plain), host_params(avg))
    if micro % 2 == 1:  # the second micro-batch of each pair applies the update
      n += 1
      d = min(0.5, (1 + n) / (10 + n))
      expect = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expect, host_params(avg))
    got = jax.tree.map(np.asarray, jax.device_get(avg.ema))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), expect, got)
  assert n == 3 and not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host_params(avg)), jax.tree.leaves(expect))
  )
  assert ts.inference_params(avg) is avg.ema and ts.inference_params(plain) is plain.params


def test_lora_trains_adapters_and_head_only() -> None:
  mesh = one_device_mesh()
  model = CoLaRModel(TINY.replace(lora_rank=4), rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  graphdef, state, frozen, step = setup(model, mesh, lora=True)
  frozen_before = jax.tree.map(np.asarray, nnx.to_pure_dict(frozen))
  batch = ts.put_batch(sft_batch(np.random.default_rng(1)), mesh, shd.DEFAULT_RULES)
  for _ in range(3):
    state, _ = step(state, frozen, batch, method="colar", c=3)
  after = nnx.to_pure_dict(nnx.state(ts.merge_model(graphdef, state.params, frozen)))
  flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  changed = {
    jax.tree_util.keystr(p)
    for p, v in jax.tree_util.tree_flatten_with_path(after)[0]
    if not np.array_equal(np.asarray(v), flat_b[p])
  }
  assert changed, "nothing trained"
  assert all("lora" in k or "latent_head" in k for k in changed), sorted(changed)
  assert any("lora_b" in k for k in changed) and any("latent_head" in k for k in changed)
  # The frozen base is bit-identical and never part of the trainable state.
  jax.tree.map(
    np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, nnx.to_pure_dict(frozen))
  )
  assert "embed" not in state.params["lm"]


def test_sharded_step_equals_unsharded() -> None:
  model = CoLaRModel(TINY, rngs=nnx.Rngs(0))
  batch_np = sft_batch(np.random.default_rng(2))
  out = []
  for mesh in (one_device_mesh(), shd.make_mesh(dict(data=2, fsdp=2, tensor=2))):
    _, state, frozen, step = setup(model, mesh, lr=1e-4)
    state, m = step(
      state, frozen, ts.put_batch(batch_np, mesh, shd.DEFAULT_RULES), method="colar", c=2
    )
    out.append((host_params(state), jax.device_get(m)))
    if mesh.size > 1:  # the weights really are split across devices
      emb = state.params["lm"]["embed"]["embedding"]
      assert len({str(s.index) for s in emb.addressable_shards}) > 1
  (p1, m1), (p8, m8) = out
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), p1, p8)


# ----------------------------------------------------------------------------- full runs
def run_args(data_dir: str, **over: Any) -> list[str]:
  """CLI overrides of a tiny, fast colar run on the synthetic task."""
  kv = {
    "data.data_dir": data_dir,
    "data.synthetic.train_size": 64,
    "data.synthetic.val_size": 8,
    "data.synthetic.test_size": 8,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "train.eval_examples": 8,
    "train.num_steps": 8,
    "train.ckpt_every": 3,
    "train.eval_every": 3,
    "train.log_every": 2,
    "train.monitor": "val/loss",
    "train.keep_last": 1,
    "train.keep_best": 1,
    "train.progress": False,
    "colar.factors": "1,3",
    "optim.lr": 1e-3,
    "jax_cache_dir": str(os.path.join(os.path.dirname(__file__), "..", ".cache", "jax_cache")),
  }
  kv.update({f"model.arch.{k}": v for k, v in TINY_ARCH.items()})
  kv.update(over)
  return [f"--config.{k}={v}" for k, v in kv.items()]


def config_from(args: list[str]) -> config.Run:
  """The typed config the CLI builds from ``args`` (for in-process runs): the same
  ``config.load`` + ``config.apply_overrides`` path as ``python -m colar_jax sft``."""
  c = config.load(os.path.join(REPO, "configs", "base.py") + ":tiny,colar")
  c.unlock()
  config.apply_overrides(c, [a[len("--config.") :] for a in args])
  return config.from_config_dict(c)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir: str) -> str:
  """An uninterrupted 8-step run (in-process, 8 fake devices); warms the compile cache."""
  wd = str(tmp_path_factory.mktemp("ref"))
  train_sft.train(config_from(run_args(data_dir)), wd)
  return wd


def cli(
  workdir: str, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "colar_jax",
      "sft",
      "--config=configs/base.py:tiny,colar",
      f"--workdir={workdir}",
      *args,
    ],
    cwd=cwd or REPO,
    capture_output=True,
    text=True,
    env={**os.environ, **(env or {})},
    timeout=600,
  )


def test_kill_and_resume_reproduces_loss_curve(reference_run: str, data_dir: str, tmp_path) -> None:
  wd = str(tmp_path / "killed")
  args = run_args(data_dir)
  killed = cli(wd, args, env={train_sft.KILL_ENV: "7"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  steps_before = [r["step"] for r in metrics.read_jsonl(wd)]
  assert max(steps_before) >= 6, steps_before  # logged past the step-6 checkpoint
  resumed = cli(wd, args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  for kind in ("train", "val"):
    ref = metrics.read_jsonl(reference_run, kind)
    got = metrics.read_jsonl(wd, kind)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
      for k in ("loss", "ce_loss", "embed_modeling_loss", "grad_norm", "c"):
        if k in a:
          assert a[k] == b[k], (kind, a["step"], k, a[k], b[k])
  # Retention: the last and the best (lowest val/loss) checkpoints survive.
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert 8 in steps and 1 <= len(steps) <= 2


def test_checkpoint_contents_and_load(reference_run: str) -> None:
  meta = checkpointing.read_meta(reference_run)
  assert meta["step"] == 8 and meta["trainable"] == "all" and meta["base"]["kind"] == "random"
  assert 0.0 < meta["embed_std"] < 1.0
  with open(os.path.join(reference_run, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model"]["arch"]["vocab_size"] > 10  # from the char tokenizer
  run = trun.load_run(reference_run, mesh=one_device_mesh())
  assert run.method == "colar" and run.embed_std == meta["embed_std"]
  assert run.run.colar.factors == (1, 3)  # the typed config round-trips the meta
  root, step = checkpointing.resolve(reference_run)
  assert step == 8 and root.endswith("checkpoints")
  # init_from: a new run starts from exactly these weights.
  c = dataclasses.replace(trun.run_of_meta(meta), init_from=reference_run)
  model, base = trun.build_model(c, one_device_mesh(), shd.DEFAULT_RULES)
  assert base["kind"] == "run"
  a = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  b = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(run.model)))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_averaged_run_saves_the_average_and_resumes_exactly(data_dir: str, tmp_path) -> None:
  """With ``optim.ema_decay``, a checkpoint's params are the average (what load_run,
  eval, export and init_from read) and the iterate travels in its train item: a run
  stopped at step 4 and resumed to 8 ends with the same average and iterate, bit for
  bit, as one that ran 8 steps (constant lr, so the step count changes nothing else)."""
  over = {"optim.ema_decay": 0.8, "train.eval_every": 0, "train.ckpt_every": 4}
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train_sft.train(config_from(run_args(data_dir, **over)), full)
  train_sft.train(config_from(run_args(data_dir, **over, **{"train.num_steps": 4})), part)
  c8 = config_from(run_args(data_dir, **over))
  train_sft.train(c8, part, allow_config_change=True)

  def saved(wd: str, item: str) -> dict:
    step_dir = os.path.join(wd, "checkpoints", "8")
    tree = checkpointing._restore_item(step_dir, item, ocp.args.StandardRestore())
    return tree if item == "params" else tree["iterate"]

  for item in ("params", "train"):
    a, b = saved(full, item), saved(part, item)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  average, iterate = saved(full, "params"), saved(full, "train")
  assert any(
    not np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(average), jax.tree.leaves(iterate))
  )
  # Switching the average off on a resume is refused, naming the entry; nothing is lost.
  off = config_from(run_args(data_dir, **{**over, "optim.ema_decay": 0.0}))
  with pytest.raises(config.ConfigError, match=r"entry iterate/.*ema_decay changed"):
    train_sft.train(off, full, allow_config_change=True)
  assert checkpointing.complete_steps(os.path.join(full, "checkpoints"))[-1] == 8
  run = trun.load_run(full, mesh=one_device_mesh())
  loaded = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), average, loaded
  )


def test_init_from_keeps_only_trained_latent_heads() -> None:
  """init_from: a CoT run's latent head was never trained, so a CoLaR run from it may
  pick another ``latent_hidden_size`` (its own fresh head); a CoLaR run's head was
  trained, so a mismatch there is a one-line ConfigError naming the parameter."""
  src_model = CoLaRModel(TINY.replace(latent_hidden_size=32), rngs=nnx.Rngs(0))
  src = nnx.to_pure_dict(nnx.state(src_model))
  wide = CoLaRModel(TINY.replace(latent_hidden_size=48), rngs=nnx.Rngs(1))
  fresh_head = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(wide))["latent_head"])
  kept = trun._untrained_heads_dropped(src, wide, "cot")
  assert "latent_head" not in kept and "lm" in kept
  checkpointing.transplant(wide, kept, "cot-run", complete=True)
  got = nnx.to_pure_dict(nnx.state(wide))
  jax.tree.map(
    np.testing.assert_array_equal, fresh_head, jax.tree.map(np.asarray, got["latent_head"])
  )
  jax.tree.map(np.testing.assert_array_equal, src["lm"], got["lm"])
  # Same shapes: copied as before.
  same = CoLaRModel(TINY.replace(latent_hidden_size=32), rngs=nnx.Rngs(1))
  assert "latent_head" in trun._untrained_heads_dropped(src, same, "cot")
  with pytest.raises(config.ConfigError, match=r"colar-run: latent_head/.* has shape"):
    checkpointing.transplant(
      wide, trun._untrained_heads_dropped(src, wide, "colar"), "colar-run", complete=True
    )


def test_nan_guard_stops_and_never_saves_nan(data_dir: str, tmp_path) -> None:
  wd = str(tmp_path / "nan")
  c = config_from(
    run_args(
      data_dir,
      **{
        "optim.lr": 1e30,
        "optim.grad_clip": 0.0,
        "train.ckpt_every": 1,
        "train.eval_every": 0,
        "train.log_every": 1,
        "colar.factors": "1",
      },
    )
  )
  assert train_sft.NonFiniteLossError is hooks.NonFiniteLossError
  with pytest.raises(hooks.NonFiniteLossError, match=r"at step \d+") as err:
    train_sft.train(c, wd)
  assert "\n" not in str(err.value)
  bad = int(str(err.value).split("at step ")[1].split()[0])
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert all(s < bad for s in steps)
  if steps:
    mesh = one_device_mesh()
    model, _ = trun.load_model(wd, mesh, shd.DEFAULT_RULES)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_cli_rejects_unknown_key(tmp_path) -> None:
  """A misspelt key is a user error: one ``error:`` line naming the nearest key, no
  traceback, nothing written."""
  res = cli(str(tmp_path / "w"), ["--config.train.num_stepz=3"])
  assert res.returncode == 1, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.train.num_stepz: no such key"), res.stderr[-2000:]
  assert "train.num_steps" in last and "Traceback" not in res.stderr
  assert not os.path.exists(str(tmp_path / "w"))
