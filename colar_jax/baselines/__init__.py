"""Table-1 baselines (No-CoT, iCoT, Coconut, Distill) as ``method`` values of the SFT trainer.

Each baseline is two plug-ins of the shared machinery, nothing else:

* an ``encode_fn(records, speed, epoch)`` for ``data.make_train_pipeline`` -
  :func:`make_encode_fn` - which decides WHAT is encoded (curricula change it per
  epoch: iCoT drops the first k steps, Coconut turns them into thoughts);
* a loss in ``losses.LOSSES`` (registered on import) for ``train_state.train_step``.

Evaluation uses the one rollout path: token decoding from the method's prompt
(No-CoT / iCoT, zero reasoning tokens at the final stage) or the fixed-length "hidden"
latent policy (Coconut / Distill) - :func:`eval_rollout_config`.

Wiring (train_sft)::

    bcfg = baselines.setup(c)                       # validates, binds Distill's weights
    enc = baselines.make_encode_fn(c.method, tok, templates, buckets, bcfg,
                                   fixed_shapes=jax.process_count() > 1)
    pipe = make_train_pipeline(src, batch_size=..., encode_fn=enc, seed=c.seed,
                               speed_sampler=SpeedSampler(factors=(1,)))
    ...  step(state, frozen, batch, method=c.method, c=1)
    stage = enc.stage(pipe.epoch_of(batch_index))   # for logs

The model of a Coconut (``use_proj``) / Distill run has ``latent_proj``
(``configlib.model_config`` sets ``ModelConfig.latent_proj_size`` from the method).
"""

from __future__ import annotations

from typing import Any

from colar_jax.baselines import objectives
from colar_jax.baselines.encoding import (BaselineEncoder, PromptSpec, answer_pred_index,
                                          chain_text, encode_baseline_batch, prompt_spec)
from colar_jax.baselines.objectives import (coconut_layout, coconut_loss, distill_loss,
                                            distill_terms, hidden_distill_loss, icot_loss,
                                            nocot_loss, smooth_l1, thought_pass)
from colar_jax.baselines.schedule import (BASELINE_METHODS, BaselineConfig, CoconutConfig,
                                          DistillConfig, StageSchedule)

__all__ = [
    "BASELINE_METHODS", "BaselineConfig", "BaselineEncoder", "CoconutConfig",
    "DistillConfig", "PromptSpec", "StageSchedule", "answer_pred_index", "chain_text",
    "coconut_layout", "coconut_loss", "distill_loss", "distill_terms",
    "encode_baseline_batch", "eval_rollout_config", "hidden_distill_loss", "icot_loss",
    "make_encode_fn", "nocot_loss", "prompt_spec", "setup", "smooth_l1", "thought_pass",
]


def setup(c: Any) -> BaselineConfig:
  """The run's :class:`BaselineConfig` (raises on bad values); binds Distill's loss
  weights into ``LOSSES["distill"]``. Call once before ``compile_steps``."""
  bcfg = BaselineConfig.from_config(c)
  objectives.configure(bcfg.distill)
  return bcfg


def make_encode_fn(method: str, tokenizer: Any, templates: Any, buckets: Any,
                   config: BaselineConfig = BaselineConfig(), *, fixed_shapes: bool = False,
                   stats: Any = None) -> BaselineEncoder:
  """The pipeline ``encode_fn`` of ``method`` (its ``.stage(epoch)`` is the curriculum)."""
  return BaselineEncoder(method, tokenizer, templates, buckets, config, fixed_shapes, stats)


def eval_rollout_config(base: Any, method: str, config: BaselineConfig, model_cfg: Any) -> Any:
  """``RolloutConfig`` that decodes ``method`` (prompts: ``evaluate.METHOD_SPECS``).

  No-CoT / iCoT: plain token decoding. Coconut / Distill: exactly
  ``config.eval_latents(method)`` thoughts (Coconut: final-stage count, reference 6),
  each the last hidden state through ``latent_proj`` when the model has one.
  """
  if method in ("nocot", "icot"):
    return base.replace(latent_mode="none")
  if method in ("coconut", "distill"):
    proj = "latent_proj" if getattr(model_cfg, "latent_proj_size", 0) > 0 else None
    return base.replace(latent_mode="hidden", max_latent_steps=config.eval_latents(method),
                        projection=proj)
  raise ValueError(f"{method!r} is not a baseline; known: {BASELINE_METHODS}")
