"""CoT SFT: cross-entropy on ``###steps ###Answer:a EOS`` after the question.

The prompt carries ``(Thinking speed: 1)###`` (the reference's ``text_generate``); this
is also CoLaR at ``c = 1`` with the latent terms off. No-CoT and iCoT train this same
objective on what their encoders keep of the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from colar_jax.data.prompts import Speed, encode_sft_batch
from colar_jax.data.records import Record
from colar_jax.methods.base import (
  Batch,
  EncodeContext,
  Method,
  Metrics,
  PromptSpec,
  check_uncompressed,
  concat_parts,
  next_token_ce,
)
from colar_jax.model import CoLaRModel


def cot_loss(
  model: CoLaRModel, batch: Batch, key: jax.Array | None = None, *, c: int = 1, settings: Any = None
) -> tuple[jax.Array, Metrics]:
  """CE on the (possibly empty) steps part and the answer part after the question."""
  del key, settings
  check_uncompressed("cot", c)
  s_mask = batch["steps_mask"].astype(bool)
  embeds, mask, labels, label_mask = concat_parts(
    batch, model, model.lm.embed_tokens(batch["steps_ids"]), s_mask, batch["steps_ids"]
  )
  out = model.lm(inputs_embeds=embeds, attention_mask=mask, logits=False)
  ce, n_tok = next_token_ce(
    model, out.hidden, mask, labels, label_mask, batch["question_ids"].shape[1]
  )
  return ce, dict(total_loss=ce, ce_loss=ce, n_tokens=n_tok)


class CoT(Method):
  name = "cot"
  prompt = PromptSpec(speed=1, separator=True)
  latent_mode = "none"

  def loss(self, model, batch, key, *, c, settings):
    return cot_loss(model, batch, key, c=c)

  def encode(
    self, run: Any, records: Sequence[Record], ctx: EncodeContext, *, speed: Speed, stage: int
  ) -> dict[str, np.ndarray]:
    # The fixed speed of the prompt, whatever the sampler drew (it only draws 1).
    return encode_sft_batch(
      records,
      ctx.tokenizer,
      ctx.templates,
      self.prompt.speed,
      ctx.buckets,
      stats=ctx.stats,
      fixed_shapes=ctx.fixed_shapes,
    )


METHOD = CoT()
