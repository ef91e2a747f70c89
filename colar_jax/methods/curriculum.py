"""The iCoT / Coconut curriculum: which stage an epoch is at, and what a stage removes.

Stage of an epoch (``config.Curriculum``)::

    stage(epoch) = min(max_stage, start_stage + epoch // epochs_per_stage)

The reference writes ``math.ceil(epoch + 1 / n_epochs_per_stage)``: ``/`` binds tighter
than ``+``, so it is ``epoch + 1`` for every n >= 2 (the stage grows EVERY epoch) and the
per-stage length is ignored. The comment next to it ("load pretrained ckpt, start from
stage 1") gives the intent, which is the formula above with ``start_stage = 1``.

At stage ``s < max_stage`` the first ``s`` reasoning steps are removed (iCoT) or
replaced by continuous thoughts (Coconut); at ``max_stage`` every step is removed /
latent, whatever the row's chain length.
"""

from __future__ import annotations

from typing import Any


def stage_of(cur: Any, epoch: int) -> int:
  """Curriculum stage of ``epoch`` under ``cur`` (a ``config.Curriculum``)."""
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, got {epoch}")
  return min(int(cur.max_stage), int(cur.start_stage) + epoch // int(cur.epochs_per_stage))


def is_final(cur: Any, stage: int) -> bool:
  """At the last stage every reasoning step is gone (removed or latent)."""
  return stage >= int(cur.max_stage)


def steps_removed(cur: Any, stage: int, n_steps: int) -> int:
  """How many leading steps of a chain with ``n_steps`` steps are dropped at ``stage``."""
  return n_steps if is_final(cur, stage) else min(stage, n_steps)
