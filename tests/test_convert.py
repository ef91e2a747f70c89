"""Conversion plumbing: CLI (``python -m colar_jax convert``), HF -> Orbax -> HF round
trips, error messages, embed_std, .bin sources, LoRA merge on export, GGUF Q/K un-permutation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from transformers import (
  AutoModelForCausalLM,
  AutoTokenizer,
  LlamaConfig,
  LlamaForCausalLM,
  PreTrainedTokenizerFast,
  Qwen2Config,
  Qwen2ForCausalLM,
)

from colar_jax import cli, config
from colar_jax.config.schema import LORA_PROJECTIONS
from colar_jax.model import sharding as shd
from colar_jax.weights import convert
from colar_jax.weights import readers as checkpoint_io

VOCAB = 64
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-5,
)


def tiny_hf(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  if kind == "llama":
    model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True))
  else:
    model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model.eval()


def tiny_tokenizer(path) -> PreTrainedTokenizerFast:
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
  fast.save_pretrained(path)
  return fast


def torch_logits(model, ids: np.ndarray) -> torch.Tensor:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 9))


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_cli_round_trip_identical(tmp_path):
  """CLI hf-to-orbax (subprocess) then orbax-to-hf: torch reloads identical weights."""
  src, dst, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "hf_back"
  model = tiny_hf("llama")
  model.save_pretrained(src)
  tok = tiny_tokenizer(src)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-m", "colar_jax", "convert", "hf-to-orbax", str(src), str(dst)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  print("\nCLI hf-to-orbax:", summary)
  for f in ("config.json", "embed_std.json", "tokenizer.json", "params"):
    assert os.path.exists(dst / f), f
  emb = model.model.embed_tokens.weight.detach().numpy()
  assert convert.read_embed_std(str(dst)) == pytest.approx(float(emb.std()), rel=1e-5)
  assert summary["embed_std"] == pytest.approx(float(emb.std()), rel=1e-5)

  back_summary = cli.main(["convert", "orbax-to-hf", str(dst), str(back)])
  assert back_summary["dst"] == str(back) and back_summary["dtype"] == "float32"
  reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
  ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
  assert set(ref_sd) == set(new_sd)
  for k in ref_sd:
    assert torch.equal(ref_sd[k], new_sd[k]), k
  assert torch.equal(torch_logits(model, IDS), torch_logits(reloaded, IDS))
  text = "w1 w5 w63 w2"
  assert AutoTokenizer.from_pretrained(back)(text)["input_ids"] == tok(text)["input_ids"]


def test_library_round_trip_sharded_qwen2(tmp_path):
  """Untied + bias model through a 2x2x2 mesh, multi-file export, bf16 restore."""
  model = tiny_hf("qwen2", seed=1)
  model.save_pretrained(tmp_path / "hf")
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), shd.MESH_AXES)
  dec = convert.load_hf_into_model(str(tmp_path / "hf"), mesh=mesh)
  std = convert.save_orbax_dir(dec, str(tmp_path / "hf"), str(tmp_path / "orbax"))
  assert std == pytest.approx(
    float(model.model.embed_tokens.weight.detach().numpy().std()), rel=1e-5
  )
  cfg, dec2 = convert.load_orbax_dir(str(tmp_path / "orbax"), mesh=mesh)
  assert not cfg.tie_embeddings and cfg.qkv_bias and cfg.model_type == "qwen2"
  k = dec2.layers.mlp.down_proj.kernel[...]
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  files = convert.export_hf(dec2, str(tmp_path / "back"), max_shard_bytes=20_000)
  assert len(files) > 1 and os.path.isfile(tmp_path / "back/model.safetensors.index.json")
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert isinstance(reloaded, Qwen2ForCausalLM)
  assert torch.equal(torch_logits(model, IDS), torch_logits(reloaded, IDS))

  _, dec_bf16 = convert.load_orbax_dir(str(tmp_path / "orbax"), param_dtype="bfloat16")
  assert dec_bf16.layers.attn.q_proj.bias[...].dtype == jnp.bfloat16


def test_lora_restore_and_merged_export(tmp_path):
  """A base dir loads into a LoRA model; export merges alpha/r * A @ B into the kernel."""
  model = tiny_hf("llama", seed=2)
  model.save_pretrained(tmp_path / "hf")
  convert.save_orbax_dir(
    convert.load_hf_into_model(str(tmp_path / "hf")), None, str(tmp_path / "orbax")
  )
  _, dec = convert.load_orbax_dir(
    str(tmp_path / "orbax"), lora_rank=2, lora_alpha=4.0, lora_targets=LORA_PROJECTIONS
  )
  b = dec.layers.mlp.up_proj.lora.lora_b
  b[...] = 0.05 * jax.random.normal(jax.random.key(0), b[...].shape)
  ours = np.asarray(dec(jnp.asarray(IDS)).logits)
  convert.export_hf(dec, str(tmp_path / "merged"))
  merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  d = float(np.abs(torch_logits(merged, IDS).numpy() - ours).max())
  base_d = float(np.abs(torch_logits(model, IDS).numpy() - ours).max())
  print(f"\nLoRA merged export: max|logit diff| = {d:.2e} (vs unmerged base {base_d:.2e})")
  assert d <= 1e-4 and base_d > 1e-3
  # A LoRA checkpoint cannot silently load into a plain model.
  convert.save_orbax_dir(dec, None, str(tmp_path / "lora_orbax"))
  with pytest.raises(ValueError, match="lora_rank > 0"):
    convert.load_orbax_dir(str(tmp_path / "lora_orbax"))


def _set_config(path, **kw) -> None:
  p = os.path.join(path, "config.json")
  with open(p) as f:
    d = json.load(f)
  d.update(kw)
  with open(p, "w") as f:
    json.dump(d, f)


SHAPES = re.compile(r"checkpoint has \([^)]*64[^)]*\) but the config expects \([^)]*48")


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_wrong_shape_is_one_line_error(tmp_path):
  model = tiny_hf("llama")
  model.save_pretrained(tmp_path / "hf")
  convert.save_orbax_dir(
    convert.load_hf_into_model(str(tmp_path / "hf")), None, str(tmp_path / "orbax")
  )
  _set_config(tmp_path / "hf", intermediate_size=48)
  with pytest.raises(ValueError) as e:
    convert.load_hf_into_model(str(tmp_path / "hf"))
  msg = str(e.value)
  print("\nHF error:", msg)
  assert "\n" not in msg and "lm/layers/mlp/" in msg and SHAPES.search(msg), msg

  _set_config(tmp_path / "orbax", intermediate_size=48)
  with pytest.raises(ValueError) as e:
    convert.load_orbax_dir(str(tmp_path / "orbax"))
  msg = str(e.value)
  print("Orbax error:", msg)
  assert "\n" not in msg and "lm/layers/mlp/" in msg and SHAPES.search(msg), msg
  with pytest.raises(SystemExit) as e:
    cli.main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "x")])
  msg = e.value.code
  print("CLI error:", msg)
  assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
  assert "lm/layers/mlp/" in msg and SHAPES.search(msg), msg


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_parse_mesh(tmp_path):
  assert convert.parse_mesh("") is None
  n = jax.device_count()
  assert dict(convert.parse_mesh("fsdp=-1").shape) == dict(data=1, fsdp=n, tensor=1)
  with pytest.raises(config.ConfigError, match="unknown axes"):
    convert.parse_mesh("model=2")
  with pytest.raises(config.ConfigError, match="is not AXIS=SIZE"):
    convert.parse_mesh("fsdp")
  with pytest.raises(SystemExit, match="^error: config: --mesh: unknown axes"):
    cli.main(["convert", "orbax-to-hf", str(tmp_path), str(tmp_path / "b"), "--mesh", "model=2"])


def test_torch_bin_source(tmp_path):
  model = tiny_hf("qwen2", seed=3)
  model.config.save_pretrained(tmp_path)
  sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  torch.save(sd, tmp_path / "pytorch_model.bin")
  src = checkpoint_io.open_source(str(tmp_path))
  assert isinstance(src, checkpoint_io.TorchBinSource)
  assert src.dtype("model.embed_tokens.weight") == jnp.bfloat16
  dec = convert.load_hf_into_model(src)
  w = dec.layers.attn.k_proj.kernel[...][1]
  ref = sd["model.layers.1.self_attn.k_proj.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(w), ref)
  # float32 source tensors cast on the host into a bf16 model.
  model.save_pretrained(tmp_path / "st")
  dec16 = convert.load_hf_into_model(str(tmp_path / "st"), param_dtype="bfloat16")
  w16 = dec16.layers.mlp.up_proj.kernel[...]
  assert w16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(w16[0]),
    model.model.layers[0].mlp.up_proj.weight.detach().numpy().T.astype(jnp.bfloat16),
  )
  emb = np.asarray(dec16.embed.embedding[...], np.float32)
  assert abs(convert.compute_embed_std(dec16) - float(emb.std())) < 1e-6


def test_gguf_unpermute_inverts_llama_cpp_permute():
  """llama.cpp interleaves each head's two rotary halves; we undo exactly that."""
  heads, hd, din = 3, 8, 5
  w = np.arange(heads * hd * din, dtype=np.float32).reshape(heads * hd, din)
  permuted = w.reshape(heads, 2, hd // 2, din).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(checkpoint_io.unpermute_rope_rows(permuted, heads), w)
  assert (
    checkpoint_io.gguf_to_hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
  )
  assert checkpoint_io.gguf_to_hf_name("output.weight") == "lm_head.weight"
  assert checkpoint_io.gguf_to_hf_name("rope_freqs.weight") is None


# HF -> GGUF names, written out independently of checkpoint_io's own table.
_TO_GGUF = {
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
}


def write_gguf(model, path, arch: str) -> None:
  """A GGUF as llama.cpp writes it: Q/K rows permuted for ``llama``, the
  embedding Q8_0-quantized; the HF model is updated to the dequantized values."""
  import gguf

  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(256)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads}
  for name, t in model.state_dict().items():
    a = t.numpy().astype(np.float32)
    if name == "lm_head.weight":
      if c.tie_word_embeddings:
        continue
      g = "output.weight"
    elif name == "model.norm.weight":
      g = "output_norm.weight"
    elif name == "model.embed_tokens.weight":
      q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
      deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
      with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.as_tensor(deq))
      w.add_tensor("token_embd.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      continue
    else:
      _, _, layer, rest = name.split(".", 3)
      mod, suffix = rest.rsplit(".", 1)
      g = f"blk.{layer}.{_TO_GGUF[mod]}.{suffix}"
      kind = mod[-6]  # "q" / "k" of self_attn.q_proj / k_proj
      if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
        n, hd = heads[kind], a.shape[0] // heads[kind]
        a = a.reshape(n, 2, hd // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    w.add_tensor(g, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_gguf_matches_hf(kind, tmp_path):
  model = tiny_hf(kind, seed=4)
  write_gguf(model, tmp_path / "m.gguf", kind)
  dec = convert.load_hf_into_model(str(tmp_path / "m.gguf"))
  assert dec.cfg.model_type == kind and dec.cfg.tie_embeddings == (kind == "llama")
  ours = np.asarray(dec(jnp.asarray(IDS)).logits)
  d = float(np.abs(torch_logits(model, IDS).numpy() - ours).max())
  print(f"\nGGUF {kind} (Q8_0 embedding): max|logit diff| = {d:.2e}")
  assert d <= 1e-4
