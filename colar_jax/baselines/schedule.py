"""Stage schedules and the (hashable) hyper-parameters of the Table-1 baselines.

Pure Python (no jax/numpy) so the data pipeline's encoders and the config checks can
use it without pulling in an accelerator runtime.

Stage of an epoch (iCoT and Coconut)::

    stage(epoch) = min(max_stage, start_stage + epoch // epochs_per_stage)

The reference writes ``math.ceil(epoch + 1 / n_epochs_per_stage)``: ``/`` binds tighter
than ``+``, so it is ``epoch + 1`` for every n >= 2 (the stage grows EVERY epoch) and the
per-stage length is ignored. The comment next to it ("load pretrained ckpt, start from
stage 1") gives the intent, which is the formula above with ``start_stage = 1``.

At stage ``s < max_stage`` the first ``s`` reasoning steps are removed (iCoT) or
replaced by ``s * n_latents_per_step`` continuous thoughts (Coconut); at ``max_stage``
every step is removed / latent, whatever the row's chain length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BASELINE_METHODS = ("nocot", "icot", "coconut", "distill")


@dataclasses.dataclass(frozen=True)
class StageSchedule:
  """Epoch -> curriculum stage (see module doc)."""

  epochs_per_stage: int = 1
  start_stage: int = 1
  max_stage: int = 3

  def __post_init__(self) -> None:
    if self.epochs_per_stage < 1:
      raise ValueError(f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")
    if not 0 <= self.start_stage <= self.max_stage:
      raise ValueError(f"need 0 <= start_stage ({self.start_stage}) <= max_stage "
                       f"({self.max_stage})")

  def stage(self, epoch: int) -> int:
    if epoch < 0:
      raise ValueError(f"epoch must be >= 0, got {epoch}")
    return min(self.max_stage, self.start_stage + epoch // self.epochs_per_stage)

  def is_final(self, stage: int) -> bool:
    """At the last stage every reasoning step is gone (removed or latent)."""
    return stage >= self.max_stage

  def steps_removed(self, stage: int, n_steps: int) -> int:
    """How many leading steps of a chain with ``n_steps`` steps are dropped at ``stage``."""
    return n_steps if self.is_final(stage) else min(stage, n_steps)


@dataclasses.dataclass(frozen=True)
class CoconutConfig:
  schedule: StageSchedule = StageSchedule(epochs_per_stage=3, start_stage=1, max_stage=3)
  n_latents_per_step: int = 2

  def __post_init__(self) -> None:
    if self.n_latents_per_step < 1:
      raise ValueError(f"n_latents_per_step must be >= 1, got {self.n_latents_per_step}")

  def n_latents(self, stage: int) -> int:
    return min(stage, self.schedule.max_stage) * self.n_latents_per_step

  @property
  def eval_latents(self) -> int:
    """Thoughts at evaluation = those of the final stage (reference: 3 x 2 = 6)."""
    return self.n_latents(self.schedule.max_stage)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """CODI-style loss: alpha * teacher CE + beta * student CE + gamma * distillation.

  ``div_std``: divide each layer's smooth-L1 by the std of the teacher's selected hidden
  states (CODI's ``distill_loss_div_std``; off in the CoLaR reference).
  """

  n_latents: int = 6
  alpha: float = 1.0
  beta: float = 1.0
  gamma: float = 1.0
  div_std: bool = False

  def __post_init__(self) -> None:
    if self.n_latents < 1:
      raise ValueError(f"distill.n_latents must be >= 1, got {self.n_latents}")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  icot: StageSchedule = StageSchedule()
  coconut: CoconutConfig = CoconutConfig()
  distill: DistillConfig = DistillConfig()

  @classmethod
  def from_config(cls, c: Any) -> "BaselineConfig":
    """From the run's ConfigDict (its ``baselines`` section); raises on bad values."""
    b = c.baselines if hasattr(c, "baselines") else c
    ic, co, di = b.icot, b.coconut, b.distill
    return cls(
        icot=StageSchedule(int(ic.epochs_per_stage), int(ic.start_stage), int(ic.max_stage)),
        coconut=CoconutConfig(
            StageSchedule(int(co.epochs_per_stage), int(co.start_stage),
                          int(co.max_latent_stage)),
            n_latents_per_step=int(co.n_latents_per_step)),
        distill=DistillConfig(n_latents=int(di.n_latents), alpha=float(di.alpha),
                              beta=float(di.beta), gamma=float(di.gamma),
                              div_std=bool(di.div_std)))

  def stage(self, method: str, epoch: int) -> int:
    """Curriculum stage of ``method`` at ``epoch`` (0 for methods without one)."""
    if method == "icot":
      return self.icot.stage(epoch)
    if method == "coconut":
      return self.coconut.schedule.stage(epoch)
    return 0

  def eval_latents(self, method: str) -> int:
    """Fixed number of continuous thoughts at evaluation (0: token decoding)."""
    if method == "coconut":
      return self.coconut.eval_latents
    if method == "distill":
      return self.distill.n_latents
    return 0
