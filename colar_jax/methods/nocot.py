"""No-CoT: the answer straight after the question (``###Answer:a EOS``), no chain.

The prompt has no speed suffix and no trailing separator (the answer part opens with
it); the objective is CoT's cross-entropy on a zero-width chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from colar_jax.data.prompts import Speed
from colar_jax.data.records import Record
from colar_jax.methods.base import EncodeContext, Method, PromptSpec, check_uncompressed
from colar_jax.methods.cot import cot_loss
from colar_jax.methods.encoding import encode_staged


class NoCoT(Method):
  name = "nocot"
  prompt = PromptSpec(speed=None, separator=False)
  latent_mode = "none"

  def loss(self, model, batch, key, *, c, settings):
    check_uncompressed(self.name, c)
    return cot_loss(model, batch, key)

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    return encode_staged(
      records,
      ctx,
      prompt=self.prompt,
      kept=[() for _ in records],
      all_gone=True,
      opened=False,
      stage=stage,
    )


METHOD = NoCoT()
