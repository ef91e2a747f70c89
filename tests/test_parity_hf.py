"""Numerical parity with transformers: tiny random Llama (GQA, llama3 RoPE) and
Qwen2 (untied, q/k/v bias) checkpoints, converted by ``colar_jax.weights.convert``.

Weights are drawn large enough (and norms / biases non-trivial) that a wrong
transpose, RoPE convention or bias mapping moves the logits far beyond the
1e-4 tolerance. Batches are left-padded; HF gets the same mask and
cumsum positions, and only real positions are compared.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from colar_jax.model import Decoder
from colar_jax.model import sharding as shd
from colar_jax.weights import convert

TOL = 1e-4
COMMON = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  rms_norm_eps=1e-5,
)
LLAMA3_ROPE = dict(
  rope_type="llama3",
  rope_theta=10000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=32,
)
CASES = {
  "llama_gqa": (
    LlamaConfig,
    LlamaForCausalLM,
    dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
  ),
  "llama3_rope": (
    LlamaConfig,
    LlamaForCausalLM,
    dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
  ),
  "qwen2": (
    Qwen2Config,
    Qwen2ForCausalLM,
    dict(
      tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)
    ),
  ),
}


def make_hf(case: str, seed: int = 0) -> torch.nn.Module:
  """A random HF model whose every parameter (norms, biases too) is non-trivial."""
  cfg_cls, model_cls, extra = CASES[case]
  cfg = cfg_cls(**COMMON, **extra)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.08)
  return model


def left_padded_batch(vocab: int, seed: int = 1, lengths=(10, 7, 4, 1), t: int = 10):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(len(lengths), t)).astype(np.int32)
  mask = np.zeros_like(ids, dtype=bool)
  for b, n in enumerate(lengths):
    mask[b, t - n :] = True
  ids = np.where(mask, ids, 0)
  pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  return ids, mask, pos


def hf_logits(model, ids, mask, pos) -> np.ndarray:
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(ids, dtype=torch.long),
      attention_mask=torch.as_tensor(mask, dtype=torch.long),
      position_ids=torch.as_tensor(pos, dtype=torch.long),
    )
  return out.logits.float().numpy()


@nnx.jit
def jax_logits(dec: Decoder, ids, mask):
  return dec(ids, attention_mask=mask).logits


@nnx.jit
def jax_logits_embeds(dec: Decoder, ids, mask):
  return dec(inputs_embeds=dec.embed_tokens(ids), attention_mask=mask).logits


def max_diff_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  return float(np.abs(a[mask] - b[mask]).max())


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
  case = request.param
  model = make_hf(case)
  path = tmp_path_factory.mktemp(case)
  model.save_pretrained(path)
  assert os.path.isfile(path / "model.safetensors")
  return case, model, str(path)


def test_logits_left_padded(converted):
  case, model, path = converted
  dec = convert.load_hf_into_model(path)
  ids, mask, pos = left_padded_batch(dec.cfg.vocab_size)
  ours = np.asarray(jax_logits(dec, jnp.asarray(ids), jnp.asarray(mask)))
  ref = hf_logits(model, ids, mask, pos)
  d = max_diff_real(ours, ref, mask)
  print(
    f"\nPARITY {case}: max|logit diff| (left-padded, real positions) = {d:.2e}"
    f" (logit scale {np.abs(ref[mask]).max():.2f})"
  )
  assert d <= TOL, (case, d)


def test_inputs_embeds_equals_ids(converted):
  case, _, path = converted
  dec = convert.load_hf_into_model(path)
  ids, mask, _ = left_padded_batch(dec.cfg.vocab_size, seed=2)
  a = np.asarray(jax_logits(dec, jnp.asarray(ids), jnp.asarray(mask)))
  b = np.asarray(jax_logits_embeds(dec, jnp.asarray(ids), jnp.asarray(mask)))
  d = max_diff_real(a, b, mask)
  print(f"\nPARITY {case}: inputs_embeds vs input_ids max diff = {d:.2e}")
  assert d <= 1e-6, (case, d)


def test_sharded_index_into_mesh(tmp_path):
  """Multi-file safetensors index, loaded straight into a 2x2x2 mesh."""
  model = make_hf("qwen2", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), shd.MESH_AXES)
  dec = convert.load_hf_into_model(str(tmp_path), mesh=mesh)
  q = dec.layers.attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
  ids, mask, pos = left_padded_batch(dec.cfg.vocab_size, seed=4)
  ours = np.asarray(jax_logits(dec, jnp.asarray(ids), jnp.asarray(mask)))
  d = max_diff_real(ours, hf_logits(model, ids, mask, pos), mask)
  print(f"\nPARITY qwen2 sharded-index on 2x2x2 mesh: max|logit diff| = {d:.2e}")
  assert d <= TOL


def test_lora_model_starts_at_base(tmp_path):
  """Converting into a LoRA decoder fills ``.base``; B = 0 keeps HF logits."""
  model = make_hf("llama_gqa", seed=5)
  model.save_pretrained(tmp_path)
  dec = convert.load_hf_into_model(str(tmp_path), lora_rank=4)
  assert float(jnp.abs(dec.layers.attn.q_proj.lora.lora_a[...]).max()) > 0
  ids, mask, pos = left_padded_batch(dec.cfg.vocab_size, seed=6)
  ours = np.asarray(jax_logits(dec, jnp.asarray(ids), jnp.asarray(mask)))
  d = max_diff_real(ours, hf_logits(model, ids, mask, pos), mask)
  print(f"\nPARITY llama LoRA(r=4) at init: max|logit diff| = {d:.2e}")
  assert d <= TOL
