"""The method registry: one file per method, one line here.

``get(name)`` returns the :class:`~colar_jax.methods.base.Method` that knows the
method's prompt, batch encoder, loss, curriculum, speeds and decoding. Adding a method
is one new file in this package and one entry in ``METHODS``.
"""

from __future__ import annotations

from colar_jax.config import ConfigError
from colar_jax.methods import coconut, colar, cot, distill, icot, nocot
from colar_jax.methods.base import EncodeContext, Method, MethodEncoder, PromptSpec

METHODS: dict[str, Method] = {
  m.name: m
  for m in (cot.METHOD, colar.METHOD, nocot.METHOD, icot.METHOD, coconut.METHOD, distill.METHOD)
}


def get(name: str) -> Method:
  """The method called ``name``; a ConfigError (a ValueError) naming ``config.method``
  otherwise, so the CLI reports it in one line."""
  try:
    return METHODS[name]
  except KeyError:
    raise ConfigError(f"config.method: {name!r} is not one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "EncodeContext", "Method", "MethodEncoder", "PromptSpec", "get"]
