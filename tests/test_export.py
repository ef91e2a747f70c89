"""``export``: a trained run as an HF directory + CoLaR parts; transformers parity and a
re-import that decodes exactly like the run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from colar_jax import cli, config
from colar_jax.data import prompts
from colar_jax.decode import rollout as R
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.train import run as run_lib
from colar_jax.train import sft
from colar_jax.weights import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(
  hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """A 2-step CoLaR run of the tiny preset on a small synthetic task (full fine-tuning)."""
  root = tmp_path_factory.mktemp("exp")
  c = config.load(os.path.join(REPO, "configs", "base.py") + ":tiny,colar")
  c.unlock()
  over = {
    "data.data_dir": str(root / "data"),
    "data.synthetic.train_size": 32,
    "data.synthetic.val_size": 8,
    "data.synthetic.test_size": 8,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "train.num_steps": 2,
    "train.ckpt_every": 2,
    "train.eval_every": 0,
    "train.progress": False,
    "train.monitor": "val/loss",
    "train.keep_best": 0,
    "colar.factors": "1,2",
    "rollout.max_latent_steps": 4,
    "rollout.max_new_tokens": 4,
    "optim.lr": 1e-2,
  }
  over.update({f"model.arch.{k}": v for k, v in ARCH.items()})
  config.apply_overrides(c, [f"{k}={v}" for k, v in over.items()])
  wd = str(root / "run")
  sft.train(config.from_config_dict(c), wd)
  return wd


def _rollout(lr, ids, mask, key):
  cfg = lr.rollout_config().replace(max_latent_steps=4, max_new_tokens=4)
  g, s = nnx.split(lr.model)
  return jax.device_get(R.rollout(g, s, ids, mask, key, cfg))


@pytest.mark.usefixtures("restore_logging")
def test_export_loads_in_transformers_and_reimports_to_the_same_rollout(trained, tmp_path, capsys):
  dst = str(tmp_path / "hf")
  summary = cli.main(["export", "--workdir", trained, dst, "--dtype", "float32"])
  assert summary["heads"] and all(h.startswith("latent_head/") for h in summary["heads"])
  info = json.loads((tmp_path / "hf" / "colar.json").read_text())
  assert info["method"] == "colar" and info["factors"] == [1, 2] and info["step"] == 2
  assert info["templates"]["separator"] == "###" and info["embed_std"] > 0

  lr = run_lib.load_run(trained)
  ids = np.asarray([[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]], np.int32)
  ours = np.asarray(lr.model.lm(jnp.asarray(ids)).logits, np.float32)
  hf = AutoModelForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

  back = run_lib.load_run(dst)  # load_run recognises an export
  assert back.method == "colar" and back.embed_std == lr.embed_std
  assert back.templates == lr.templates
  enc = prompts.encode_prompt_batch(
    ["x=2;x*3?", "x=5;x+4?"], lr.tokenizer, lr.templates, 2, lr.buckets
  )
  q, m = enc["question_ids"], enc["question_mask"]
  a = _rollout(lr, q, m, jax.random.key(3))
  b = _rollout(back, q, m, jax.random.key(3))
  np.testing.assert_allclose(b.latents, a.latents, atol=1e-5)
  np.testing.assert_array_equal(b.num_latents, a.num_latents)
  np.testing.assert_array_equal(b.answer_ids, a.answer_ids)
  np.testing.assert_array_equal(b.answer_mask, a.answer_mask)

  with pytest.raises(SystemExit, match="^error: config: --workdir .* is already an export"):
    cli.main(["export", "--workdir", dst, str(tmp_path / "again")])


def test_lora_adapters_are_merged(tmp_path):
  """A LoRA model's export equals base + alpha/r * A @ B (random, non-zero adapters)."""
  texts = ["x=2;x*3?", "6"]
  tok_dir = tmp_path / "tok"
  prompts.train_char_tokenizer(texts, tok_dir)
  tok = prompts.load_tokenizer(str(tok_dir))
  mc = ModelConfig(vocab_size=len(tok), lora_rank=4, lora_alpha=8.0, **ARCH)
  model = CoLaRModel(mc, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  rng = np.random.default_rng(0)
  nnx.update(
    model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
  )
  dst = str(tmp_path / "hf")
  export.export_model(
    model, dst, tokenizer_dir=str(tok_dir), info=dict(method="cot"), dtype="float32"
  )
  ids = np.asarray([[1, 2, 3, 4, 5]], np.int32)
  ours = np.asarray(model.lm(jnp.asarray(ids)).logits, np.float32)
  hf = AutoModelForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert float(np.abs(ours).max()) > 0


def test_peft_adapter_dir_equals_the_merged_export(tmp_path):
  """``--peft``: the un-merged adapters under PEFT's names and shapes; merged by hand
  (W + alpha/r * B @ A) they give the merged export's weights, and PEFT on top of the
  exported base gives the merged export's logits."""
  tok_dir = tmp_path / "tok"
  prompts.train_char_tokenizer(["x=2;x*3?", "6"], tok_dir)
  tok = prompts.load_tokenizer(str(tok_dir))
  mc = ModelConfig(vocab_size=len(tok), lora_rank=4, lora_alpha=8.0, **ARCH)
  model = CoLaRModel(mc, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  state = nnx.state(model, nnx.LoRAParam)
  nnx.update(
    model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
  )
  dst = tmp_path / "hf"
  out = export.export_model(
    model, str(dst), tokenizer_dir=str(tok_dir), info=dict(method="cot"), dtype="float32", peft=True
  )
  assert out["peft"] == ["adapter_config.json", "adapter_model.safetensors", "base/"]
  conf = json.loads((dst / "peft" / "adapter_config.json").read_text())
  assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
  assert conf["target_modules"] == ["q_proj", "v_proj"]  # the reference's LoRA targets
  ad = load_file(str(dst / "peft" / "adapter_model.safetensors"))
  merged = load_file(str(dst / "model.safetensors"))
  base = load_file(str(dst / "peft" / "base" / "model.safetensors"))
  # PEFT's naming: base_model.model.<HF module>.lora_{A,B}.weight, A [r, in], B [out, r].
  want = {
    f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
    for i in range(2)
    for p in ("q_proj", "v_proj")
    for ab in "AB"
  }
  assert set(ad) == want
  q_out, v_out, hidden = 2 * 16, 1 * 16, 32
  for i in range(2):
    for p, n_out in (("q_proj", q_out), ("v_proj", v_out)):
      pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
      a, b = ad[f"{pre}.lora_A.weight"], ad[f"{pre}.lora_B.weight"]
      assert a.shape == (4, hidden) and b.shape == (n_out, 4)
      w = f"model.layers.{i}.self_attn.{p}.weight"  # HF [out, in]
      np.testing.assert_allclose(base[w] + 8.0 / 4 * b @ a, merged[w], atol=1e-5)
      assert float(np.abs(merged[w] - base[w]).max()) > 1e-3  # the adapters do something
  untouched = "model.layers.0.self_attn.k_proj.weight"
  np.testing.assert_array_equal(base[untouched], merged[untouched])

  peft = pytest.importorskip("peft")  # optional: not a dependency of the package
  ids = torch.tensor([[1, 2, 3, 4, 5]])
  hf_base = AutoModelForCausalLM.from_pretrained(
    str(dst / "peft" / "base"), torch_dtype=torch.float32
  )
  with_adapter = peft.PeftModel.from_pretrained(hf_base, str(dst / "peft")).eval()
  hf_merged = AutoModelForCausalLM.from_pretrained(str(dst), torch_dtype=torch.float32).eval()
  with torch.no_grad():
    a_logits = with_adapter(ids).logits.numpy()
    m_logits = hf_merged(ids).logits.numpy()
  np.testing.assert_allclose(a_logits, m_logits, atol=1e-4, rtol=0)
