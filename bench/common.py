"""Shared bench helpers: device peaks measured in the same run, memory, presets."""

from __future__ import annotations

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp

# Vendor dense peaks (TFLOP/s, bf16) and HBM bandwidth (GB/s) for known accelerators.
# Printed next to the peaks measured in the same run (a large matmul, a streaming
# copy), which are what a kernel can actually reach: on an H200 the measured bf16
# matmul is ~790 TFLOP/s, the figure issue #8 states its MFU target against.
KNOWN = {
  "H100": (989.0, 3350.0),
  "H200": (989.0, 4800.0),
  "A100": (312.0, 2039.0),
  "TPU v5p": (459.0, 2765.0),
  "TPU v5 lite": (197.0, 819.0),
  "TPU v4": (275.0, 1228.0),
}


@dataclasses.dataclass(frozen=True)
class Peaks:
  measured_tflops: float  # one large square matmul in the bench's dtype
  measured_gbs: float  # streaming read + write
  vendor_tflops: float | None = None
  vendor_gbs: float | None = None
  vendor_name: str = ""

  def describe(self) -> str:
    s = (
      f"measured peaks: matmul {self.measured_tflops:.3f} TFLOP/s, "
      f"copy {self.measured_gbs:.0f} GB/s"
    )
    if self.vendor_name:
      s += (
        f"; vendor ({self.vendor_name}): {self.vendor_tflops:.0f} TFLOP/s bf16 dense, "
        f"{self.vendor_gbs:.0f} GB/s"
      )
    return s


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def on_accelerator() -> bool:
  return jax.devices()[0].platform != "cpu"


def _timeit(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def measured_matmul_tflops(dtype=jnp.float32, n: int = 2048) -> float:
  """Achieved TFLOP/s of one large square matmul: the practical peak on this device."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)  # random data: zeros run faster on GPUs
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n**3 / _timeit(f, a, b, reps=10) / 1e12


def measured_bandwidth_gbs(n_bytes: int = 1 << 28) -> float:
  """Achieved GB/s of a streaming read+write (x * 2 over a large buffer)."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  f = jax.jit(lambda v: v * 2.0)
  return 2 * n_bytes / _timeit(f, x, reps=10) / 1e9


def peaks(dtype=jnp.float32) -> Peaks:
  """Peaks measured now (sized for the device) plus vendor figures where known."""
  acc = on_accelerator()
  measured = (
    measured_matmul_tflops(dtype, 8192 if acc else 2048),
    measured_bandwidth_gbs(1 << 31 if acc else 1 << 28),
  )
  kind = getattr(jax.devices()[0], "device_kind", "")
  for k, (tf, bw) in KNOWN.items():
    if k.lower() in kind.lower():
      return Peaks(*measured, tf, bw, k)
  return Peaks(*measured)


def peak_memory_gb() -> float:
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host RSS (kB -> GB)
