"""CoLaR SFT train-step throughput, compile time, peak memory and MFU.

    python bench/train_step.py --preset tiny --batch 32 --chain 96 --c 5
    python bench/train_step.py --preset llama32_1b --batch 32,64,128 --dtype bfloat16 --c 2

Random weights and token ids in the shape of a real batch (question / chain /
answer parts); ``--batch`` takes a list and reuses one model and optimizer state.
MFU is model FLOPs (6*N per processed position plus causal attention, the PaLM
definition: recomputation from remat does not count) per second over the peak of
a large matmul measured in this run, and over the vendor's figure where known.
XLA's own count of the compiled step is printed beside it. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from colar_jax import config, methods  # noqa: E402
from colar_jax.model import CoLaRModel  # noqa: E402
from colar_jax.model import sharding as shd  # noqa: E402
from colar_jax.train import state as ts  # noqa: E402
from colar_jax.train.run import model_config  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny")
  p.add_argument("--batch", default="32", help="comma list")
  p.add_argument("--question", type=int, default=32)
  p.add_argument("--chain", type=int, default=96)
  p.add_argument("--answer", type=int, default=8)
  p.add_argument("--c", type=int, default=5)
  p.add_argument("--method", default="colar")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--lora", type=int, default=0)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--mesh", default="data=-1")
  p.add_argument("--attention", default=None, help="dot_product_attention implementation")
  a = p.parse_args()

  c = config.apply_preset(config.base_config(), a.preset)
  c.method = a.method
  c.model.dtype, c.model.lora_rank, c.model.remat = a.dtype, a.lora, a.remat
  c.model.param_dtype = "float32"
  c.model.attention_impl = a.attention
  run = config.from_config_dict(c)
  mc = model_config(run)
  mesh = shd.make_mesh({k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))})
  rules = shd.logical_rules(run.sharding)
  model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, params, frozen = ts.split_model(model, a.lora > 0)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.lm)))
  n_train = sum(x.size for x in jax.tree.leaves(params))
  tx = ts.make_optimizer(run.optim, 1000)
  p_shard = ts.param_shardings(nnx.State(params), mesh, rules)
  shard = ts.state_shardings(tx, params, p_shard, mesh)
  state = ts.init_train_state(params, tx, 0, shard)
  del model, params
  step, _ = ts.compile_steps(graphdef, tx, methods.get(a.method).loss_settings(run, 0.02), shard)

  c_eff = a.c if a.method == "colar" else 1
  pk = common.peaks(jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32)
  print(
    f"device {common.device_name()} x{jax.device_count()}  preset {a.preset}  "
    f"params {n_params / 1e6:.1f}M (trainable {n_train / 1e6:.2f}M)  dtype {a.dtype}  "
    f"method {a.method} c={c_eff}  attention {a.attention or 'xla'}"
  )
  print(pk.describe())

  def bench_batch(b: int, state):
    """Compiles and times the step at batch ``b``; returns the advanced state."""
    rng = np.random.default_rng(0)
    v = mc.vocab_size

    def ones(n):
      return np.ones((b, n), np.int32)

    batch = dict(
      question_ids=rng.integers(1, v, (b, a.question)).astype(np.int32),
      question_mask=ones(a.question),
      steps_ids=rng.integers(1, v, (b, a.chain)).astype(np.int32),
      steps_mask=ones(a.chain),
      answer_ids=rng.integers(1, v, (b, a.answer)).astype(np.int32),
      answer_mask=ones(a.answer),
    )
    batch = ts.put_batch(batch, mesh, rules)

    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, method=a.method, c=c_eff).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = None
    try:
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      xla_flops = float(ca.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best effort per backend
      pass
    state, m = compiled(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    for _ in range(a.steps):
      state, m = compiled(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    dt = (time.perf_counter() - t) / a.steps

    latents = -(-a.chain // c_eff)
    seq = a.question + latents + 1 + a.answer  # positions actually processed
    tokens = b * seq
    # Causal attention: QK^T and AV over half the square, x3 for forward + backward.
    attn = 6 * mc.num_layers * b * seq * seq * mc.num_heads * mc.head_dim
    model_flops = (4 if a.lora else 6) * n_params * tokens + attn  # LoRA: no base weight grads
    achieved = model_flops / dt / 1e12
    mfu = f"MFU {achieved / pk.measured_tflops:.1%} of measured"
    if pk.vendor_tflops:
      mfu += f", {achieved / pk.vendor_tflops:.1%} of vendor"
    xla = f"{xla_flops:.3e}" if xla_flops else "n/a"
    print(
      f"batch {b:4d} x {seq} positions (chain {a.chain} -> {latents})  "
      f"compile {compile_s:.1f}s  step {dt * 1e3:.1f} ms  {tokens / dt:,.0f} tokens/s  "
      f"loss {float(m['loss']):.3f}"
    )
    print(
      f"           model FLOPs/step {model_flops:.3e} (XLA-counted {xla})  "
      f"{achieved:.3f} TFLOP/s  {mfu}  peak memory {common.peak_memory_gb():.2f} GB"
    )
    return state

  for b in [int(x) for x in a.batch.split(",")]:
    state = bench_batch(b, state)


if __name__ == "__main__":
  main()
