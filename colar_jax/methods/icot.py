"""iCoT (stepwise internalisation): CoT cross-entropy on the steps a curriculum keeps.

Stage s (``baselines.icot``, :mod:`colar_jax.methods.curriculum`) removes the first s
reasoning steps; the final stage removes them all (the model answers directly). The
prompt is No-CoT's (no speed suffix, no trailing separator), the decoding plain tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from colar_jax.data.prompts import Speed
from colar_jax.data.records import Record
from colar_jax.methods.base import EncodeContext, Method, PromptSpec, check_uncompressed
from colar_jax.methods.cot import cot_loss
from colar_jax.methods.curriculum import stage_of
from colar_jax.methods.encoding import encode_curriculum


class ICoT(Method):
  name = "icot"
  prompt = PromptSpec(speed=None, separator=False)
  latent_mode = "none"

  def loss(self, model, batch, key, *, c, settings):
    check_uncompressed(self.name, c)
    return cot_loss(model, batch, key)

  def stage(self, run: Any, epoch: int) -> int:
    return stage_of(run.baselines.icot, epoch)

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    return encode_curriculum(records, ctx, prompt=self.prompt, cur=run.baselines.icot, stage=stage)


METHOD = ICoT()
