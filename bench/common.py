"""Shared bench helpers: device peaks measured in the same run, memory, presets."""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp

# Vendor dense peaks (TFLOP/s, bf16) and HBM bandwidth (GB/s) for known accelerators.
# The H100 figure is the one the project targets against (SXM ~989 dense; we use
# the 790 to stay comparable). CPU peaks are measured below instead.
KNOWN = {
    "H100": (790.0, 3350.0),
    "H200": (989.0, 4800.0),
    "A100": (312.0, 2039.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v4": (275.0, 1228.0),
}


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def _timeit(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def measured_matmul_tflops(dtype=jnp.float32, n: int = 2048) -> float:
  """Achieved TFLOP/s of one large square matmul: the practical peak on this device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / _timeit(f, a) / 1e12


def measured_bandwidth_gbs(n_bytes: int = 1 << 28) -> float:
  """Achieved GB/s of a streaming read+write (x * 2 over a large buffer)."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  f = jax.jit(lambda v: v * 2.0)
  return 2 * n_bytes / _timeit(f, x) / 1e9


def peaks(dtype=jnp.float32) -> tuple[float, float, str]:
  """(TFLOP/s, GB/s, source): vendor figures on known accelerators, else measured."""
  kind = getattr(jax.devices()[0], "device_kind", "")
  for k, (tf, bw) in KNOWN.items():
    if k.lower() in kind.lower():
      return tf, bw, f"vendor peak ({k})"
  return measured_matmul_tflops(dtype), measured_bandwidth_gbs(), "measured in this run"


def peak_memory_gb() -> float:
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host RSS (kB -> GB)
