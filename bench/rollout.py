"""Latent rollout throughput vs the memory-bandwidth roofline; CoLaR-c vs CoT speedup.

    python bench/rollout.py --preset tiny --batches 1,32,256 --cot-len 60 --c 2,5

Random weights; the stop tokens are set unreachable so every row runs exactly
the requested number of steps: CoT decodes ``cot_len + answer`` tokens, CoLaR-c
runs ``ceil(cot_len / c)`` latent steps + ``answer`` tokens. The #L ratio is
therefore exactly c-ish, and the wall-clock ratio measured here is what the
compression buys. At batch 1 each step is compared with the roofline
``parameter bytes / memory bandwidth`` (a streaming copy measured in this run; on
known accelerators also the vendor's figure). Prints ratios; asserts nothing.
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

from colar_jax import config  # noqa: E402
from colar_jax.decode.rollout import RolloutConfig, rollout  # noqa: E402
from colar_jax.model import CoLaRModel  # noqa: E402
from colar_jax.train.run import model_config  # noqa: E402


def timed(graphdef, state, ids, mask, cfg, reps: int, profile: str = "") -> float:
  key = jax.random.key(0)

  def run(k):
    return rollout(graphdef, state, ids, mask, k, cfg, batch_buckets=None)

  jax.block_until_ready(run(key))
  t = time.perf_counter()
  for i in range(reps):
    out = run(jax.random.fold_in(key, i))
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t) / reps
  if profile:  # one more call under the profiler, outside the timed loop
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      jax.block_until_ready(run(key))
  return dt


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batches", default="1,32,256")
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--cot-len", type=int, default=60)
  p.add_argument("--answer", type=int, default=8)
  p.add_argument("--c", default="2,5")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument(
    "--profile",
    default="",
    help="dir: trace one batch-1 call of each mode (bench/trace_summary.py reads it)",
  )
  a = p.parse_args()

  c = config.apply_preset(config.base_config(), a.preset)
  c.model.dtype = c.model.param_dtype = a.dtype
  mc = model_config(config.from_config_dict(c))
  model = CoLaRModel(mc, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.lm)))
  pk = common.peaks()
  print(
    f"device {common.device_name()}  preset {a.preset}  dtype {a.dtype}  params "
    f"{param_bytes / 1e6:.1f} MB"
  )
  print(pk.describe())
  base = dict(separator_id=-1, eos_id=-1, embed_std=0.02, top_p=1.0)
  cot_cfg = RolloutConfig(latent_mode="none", max_new_tokens=a.cot_len + a.answer, **base)
  for bsz in [int(x) for x in a.batches.split(",")]:
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, mc.vocab_size, (bsz, a.prompt)), jnp.int32)
    mask = jnp.ones_like(ids, bool)
    prof = f"{a.profile}/b{bsz}_" if a.profile and bsz == 1 else ""  # trace dir prefix
    t_cot = timed(graphdef, state, ids, mask, cot_cfg, a.reps, prof and prof + "cot")
    print(
      f"batch {bsz:4d}  CoT  #L={a.cot_len:3d}  {t_cot * 1e3:8.1f} ms  "
      f"{bsz / t_cot:8.1f} questions/s"
    )
    for cf in [int(x) for x in a.c.split(",")]:
      n_lat = -(-a.cot_len // cf)
      cfg = RolloutConfig(
        latent_mode="sampled", max_latent_steps=n_lat, max_new_tokens=a.answer, **base
      )
      t = timed(graphdef, state, ids, mask, cfg, a.reps, prof and f"{prof}colar{cf}")
      ratio_l = (a.cot_len + a.answer) / (n_lat + 1 + a.answer)
      print(
        f"batch {bsz:4d}  CoLaR-{cf} #L={n_lat:3d}  {t * 1e3:8.1f} ms  "
        f"{bsz / t:8.1f} questions/s  speedup vs CoT {t_cot / t:5.2f}x  "
        f"step-count ratio {ratio_l:5.2f}x  efficiency {t_cot / t / ratio_l:5.2f}"
      )
      if bsz == 1:
        # Per decode step (latent or token) against the weight-streaming roofline.
        steps = n_lat + 1 + a.answer
        per_step = t / steps
        roof = param_bytes / (pk.measured_gbs * 1e9)
        line = (
          f"           per step {per_step * 1e6:8.1f} us  roofline {roof * 1e6:8.1f} us "
          f"at the measured copy rate ({roof / per_step:.1%} of bandwidth bound)"
        )
        if pk.vendor_gbs:
          vroof = param_bytes / (pk.vendor_gbs * 1e9)
          line += f"; {vroof * 1e6:.1f} us at the vendor's ({vroof / per_step:.1%})"
        print(line)


if __name__ == "__main__":
  main()
