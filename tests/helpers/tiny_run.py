"""One tiny trained CoLaR run shared by tests/test_user_errors.py and tests/test_faults.py
(trained once per test process): 4 steps, checkpoints at steps 2 and 4, thinking speeds
1 and 2. Tests that change a run work on :func:`copy_run` copies."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from colar_jax import config
from colar_jax.train import sft

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "base.py") + ":tiny,colar"
_RUNS: dict[str, tuple[str, str]] = {}


def overrides(data_dir: str, **over: Any) -> list[str]:
  """``--config.k=v`` flags of the tiny run (any of them replaced by ``over``)."""
  kv: dict[str, Any] = {
    "data.data_dir": data_dir,
    "data.synthetic.train_size": 32,
    "data.synthetic.val_size": 8,
    "data.synthetic.test_size": 8,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "train.num_steps": 4,
    "train.ckpt_every": 2,
    "train.eval_every": 0,
    "train.log_every": 2,
    "train.keep_last": 2,
    "train.keep_best": 0,
    "train.monitor": "val/loss",
    "train.progress": False,
    "colar.factors": "1,2",
    "optim.lr": 1e-3,
    "rollout.max_latent_steps": 8,
    "rollout.max_new_tokens": 4,
    "model.arch.hidden_size": 32,
    "model.arch.intermediate_size": 64,
    "model.arch.num_layers": 1,
    "model.arch.num_heads": 2,
    "model.arch.num_kv_heads": 1,
    "model.arch.head_dim": 16,
    "jax_cache_dir": "",  # the suite's conftest already set the compilation cache
  }
  kv.update(over)
  return [f"--config.{k}={v}" for k, v in kv.items()]


def run_config(data_dir: str, **over: Any) -> config.Run:
  """The typed config the CLI builds from :func:`overrides` (for in-process runs)."""
  c = config.load(CONFIG)
  c.unlock()
  config.apply_overrides(c, [a[len("--config.") :] for a in overrides(data_dir, **over)])
  return config.from_config_dict(c)


def trained_run(tmp_path_factory: Any) -> tuple[str, str]:
  """(workdir, data dir) of the shared run; never modify it (see :func:`copy_run`)."""
  if "run" not in _RUNS:
    root = tmp_path_factory.mktemp("tiny_run")
    data_dir, wd = str(root / "data"), str(root / "run")
    sft.train(run_config(data_dir), wd)
    _RUNS["run"] = (wd, data_dir)
  return _RUNS["run"]


def copy_run(src: str, dst: str) -> str:
  """A copy of a run that is its own: the checkpoints' tokenizer path points into it."""
  shutil.copytree(src, dst)
  for step in os.listdir(os.path.join(dst, "checkpoints")):
    path = os.path.join(dst, "checkpoints", step, "meta", "metadata")
    if os.path.isfile(path):
      with open(path) as f:
        meta = json.load(f)
      meta["tokenizer_dir"] = meta["tokenizer_dir"].replace(src, dst)
      with open(path, "w") as f:
        json.dump(meta, f)
  return dst
