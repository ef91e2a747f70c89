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
