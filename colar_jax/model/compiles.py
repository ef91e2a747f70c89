"""How many XLA programs a piece of work compiled, and how long that took.

:class:`CompileLog` listens to ``jax.monitoring`` while it is active: JAX records one
``backend_compile`` duration per program it compiles (a persistent-cache hit included,
then short; those are also counted as ``cache_hits``) and one ``jaxpr_trace`` duration
per traced function. The pipelines print ``compiles`` and ``compile_s`` per phase, the
figure a short GPU window is budgeted by.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax.monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
JAXPR_TRACE = "/jax/core/compile/jaxpr_trace_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileLog:
  """``with CompileLog() as log: ...``, then ``log.compiles``, ``log.compile_s`` ..."""

  compiles: int = 0  # backend compilations (persistent-cache hits included)
  compile_s: float = 0.0
  cache_hits: int = 0
  traces: int = 0
  trace_s: float = 0.0
  by_function: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

  def _on_duration(self, event: str, duration: float, **kw: Any) -> None:
    if event == BACKEND_COMPILE:
      self.compiles += 1
      self.compile_s += float(duration)
      self.by_function[str(kw.get("fun_name", "?"))] += 1
    elif event == JAXPR_TRACE:
      self.traces += 1
      self.trace_s += float(duration)

  def _on_event(self, event: str, **kw: Any) -> None:
    if event == CACHE_HIT:
      self.cache_hits += 1

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)

  def summary(self) -> dict[str, Any]:
    return dict(
      compiles=self.compiles,
      compile_s=round(self.compile_s, 1),
      cache_hits=self.cache_hits,
      trace_s=round(self.trace_s, 1),
      top=dict(self.by_function.most_common(4)),
    )

  def line(self) -> str:
    return (
      f"{self.compiles} XLA compiles in {self.compile_s:.1f}s"
      f" ({self.cache_hits} from the persistent cache), tracing {self.trace_s:.1f}s"
    )
