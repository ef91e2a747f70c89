"""``make demo``: the embedded default end to end.

PLACEHOLDER until the demo issue lands: builds the tiny preset, runs a forward
pass and a few latent steps, and says so. The full pipeline (synthetic data ->
CoT SFT -> CoLaR SFT -> GRPO -> baselines -> evaluation table + plot) replaces
this file.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from colar_jax import configlib
from colar_jax.model import CoLaRModel, KVCache


def main() -> None:
  t0 = time.time()
  c = configlib.base_config()
  mc = configlib.model_config(c)
  model = CoLaRModel(mc, rngs=nnx.Rngs(c.seed))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  ids = jnp.arange(1, 13, dtype=jnp.int32)[None] % mc.vocab_size
  cache = KVCache.init(mc, 1, 32)
  out = model.lm(ids, cache=cache)
  h, cache = out.hidden[:, -1:], out.cache
  for _ in range(4):  # four silent latent steps, as the CoLaR rollout does
    z = model.latent_head(h).sample(jax.random.key(0)) * 0.02
    out = model.lm(inputs_embeds=z, cache=cache)
    h, cache = out.hidden, out.cache
  print(f"[demo placeholder] tiny CoLaR model: {n_params/1e6:.2f}M params, prefill 12 "
        f"tokens + 4 latent steps, cache index {int(cache.index[0])}, "
        f"{time.time() - t0:.1f}s. The full training demo lands with the demo issue.")


if __name__ == "__main__":
  main()
