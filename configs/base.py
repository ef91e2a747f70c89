"""Base config: ``--config=configs/base.py:PRESET[,METHOD]``.

PRESET: tiny | smollm2_135m | llama32_1b | qwen2_1p5b.  METHOD: cot | colar | nocot |
icot | coconut | distill.  Every key, its default and its meaning:
``python -m colar_jax config show configs/base.py:tiny``. Example::

  python -m colar_jax sft --config=configs/base.py:tiny,cot --workdir=/tmp/r \\
      --config.train.num_steps=200
"""

from colar_jax import config


def get_config(arg: str = "tiny"):
  parts = [p for p in (arg or "tiny").split(",") if p]
  c = config.apply_preset(config.base_config(), parts[0])
  if len(parts) > 1:
    c.method = parts[1]
  if parts[0] != "tiny":
    # Real models: LoRA as the reference (rank 128, alpha 32) and bf16 compute.
    c.model.lora_rank = 128
    c.model.dtype = "bfloat16"
    c.data.dataset = "gsm8k"
  return c
