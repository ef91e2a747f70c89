"""``eval`` / ``generate`` on a converted base model (no training run), batch shapes sized
to the work, and one rollout program per batch shape across factors and datasets."""

from __future__ import annotations

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colar_jax import cli, config
from colar_jax import evaluate as ev
from colar_jax.data import prompts
from colar_jax.decode import rollout
from colar_jax.decode.generate import batch_buckets
from colar_jax.model import CoLaRModel, Decoder, ModelConfig
from colar_jax.train import run as run_lib
from colar_jax.weights import convert

TEXTS = ["x=2;x*3?", "x=5;x+4?", "what is 7 minus 1?", "0123456789", "abcdefghijklmnopqrstuvwxyz"]
MCFG = dict(
  hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64
)
# Settings no other test decodes with, so the first call of each test traces afresh.
SMALL = [
  "--config.data.synthetic.train_size=16",
  "--config.data.synthetic.val_size=8",
  "--config.data.synthetic.test_size=8",
  "--config.data.question_buckets=64",
  "--config.rollout.max_new_tokens=5",
  "--config.jax_cache_dir=",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
  """A converted dir (``convert.save_orbax_dir``) of a random tiny decoder + char tokenizer."""
  root = tmp_path_factory.mktemp("base")
  tok = prompts.train_char_tokenizer(TEXTS, root / "tok")
  dec = Decoder(ModelConfig(vocab_size=len(tok), **MCFG), rngs=nnx.Rngs(3))
  convert.save_orbax_dir(dec, str(root / "tok"), str(root / "model"))
  return str(root / "model")


def _greedy_oracle(dec: Decoder, prompt_ids: list[int], n: int, eos: int) -> list[int]:
  """Greedy decoding of the converted weights by repeated FULL forwards (no cache, no
  rollout): the plain base model."""
  ids, out = list(prompt_ids), []
  for _ in range(n):
    logits = dec(jnp.asarray([ids], jnp.int32)).logits[0, -1]
    tok = int(np.argmax(np.asarray(logits, np.float32)))
    out.append(tok)
    if tok == eos:
      break
    ids.append(tok)
  return out


@pytest.mark.usefixtures("restore_logging")
def test_eval_a_converted_base_model_decodes_the_plain_weights(base_dir, tmp_path):
  data = str(tmp_path / "data")
  out = tmp_path / "out"
  res = cli.main(
    ["eval", f"--workdir={base_dir}", "--dataset=synthetic", f"--data_dir={data}"]
    + ["--compression=1,2", "--seeds=1", "--max_examples=3", "--method=cot", "--greedy"]
    + ["--no_progress", f"--out_dir={out}", *SMALL]
  )
  assert res["num_questions"] == 3 and list(res["factors"]) == [1]  # CoT ignores c
  assert res["checkpoint"] == base_dir and res["step"] is None
  recs = [json.loads(x) for x in (out / "synthetic_test.jsonl").read_text().splitlines()]
  assert len(recs) == 3
  tok = prompts.load_tokenizer(base_dir, pad_as_eos=True)
  t = prompts.PromptTemplates()
  _, dec = convert.load_orbax_dir(base_dir)
  for r in recs:
    # The CoT prompt of the reference (question, no speed, then ###), unpadded.
    ids = tok(t.question_text(r["question"], None) + t.separator)["input_ids"]
    want = _greedy_oracle(dec, ids, 5, tok.eos_token_id)
    assert r["output"] == tok.decode(want, skip_special_tokens=True), r
    assert r["answer_length"] == len(want)
  # A latent method needs a trained latent head: one line, before any decoding.
  with pytest.raises(SystemExit, match="token method"):
    cli.main(["eval", f"--workdir={base_dir}", "--method=colar", f"--out_dir={out}", *SMALL])


@pytest.mark.usefixtures("restore_logging")
def test_generate_on_a_base_model_compiles_once_for_many_questions_and_speeds(
  base_dir, monkeypatch, capsys
):
  monkeypatch.setattr("sys.stdin", io.StringIO("x=2;x*3?\nwhat is 7 minus 1 and then 2?\n\n"))
  before = rollout.compilation_count()
  cli.main(
    ["generate", f"--workdir={base_dir}", "--method=nocot", "--speeds=1,3", "--interactive"]
    + ["--config.rollout.max_new_tokens=6", "--config.jax_cache_dir="]
  )
  out = capsys.readouterr().out
  assert out.count("answer:") == 4 and out.count("speed: 3") == 2
  assert rollout.compilation_count() - before == 1


def test_batch_buckets():
  assert batch_buckets(64) == (8, 16, 32, 64)
  assert batch_buckets(64, 8) == (8, 16, 32, 64)
  assert batch_buckets(64, 16) == (16, 32, 64)  # halvings rounded up to the devices
  assert batch_buckets(12, 8) == (2, 3, 6, 12)  # 12 does not split 8 ways: no rounding
  assert batch_buckets(1, 8) == (1,) and batch_buckets(2) == (1, 2)
  assert batch_buckets(64, 1, choices=1) == (64,)


def test_eval_batches_sized_to_the_work_one_program_per_shape(monkeypatch):
  """20 questions at eval batch 64 decode as ONE batch of 32 rows (not 64); two datasets
  (prompts of very different lengths) at two thinking speeds run ONE rollout program."""
  tok = prompts.train_char_tokenizer(TEXTS, "/tmp/colar_test_base_tok")
  mc = ModelConfig(vocab_size=len(tok), **MCFG)
  c = config.base_config()
  c.rollout.max_latent_steps = 3
  c.rollout.max_new_tokens = 7  # no other test decodes with it: the first call traces
  lr = run_lib.LoadedRun(
    model=CoLaRModel(mc, rngs=nnx.Rngs(0)),
    tokenizer=tok,
    run=config.from_config_dict(c),
    embed_std=0.02,
    meta={},
  )
  shapes = []
  real = rollout.rollout_fn

  def spy(graphdef, state, ids, *a, **kw):
    shapes.append(tuple(ids.shape))
    return real(graphdef, state, ids, *a, **kw)

  monkeypatch.setattr(rollout, "rollout_fn", spy)
  short = [f"x={i % 10};x+1?" for i in range(20)]
  long = [f"what is {i % 10} plus 2 and then minus 1 and then times 3?" for i in range(20)]
  assert len(tok(prompts.PromptTemplates().question_text(long[0], 1))["input_ids"]) > 64
  before = rollout.compilation_count()
  for qs in (short, long):
    res = ev.evaluate(
      lr.model,
      lr.tokenizer,
      qs,
      ["0"] * len(qs),
      "colar",
      [1, 2],
      1,
      64,
      lr.rollout_config(),
      run=lr.run,
      templates=lr.templates,
      buckets=lr.buckets,
      progress=False,
      log=lambda s: None,
      bucket_choices=4,
      fixed_prompt_length=True,
    )
    assert sorted(res["factors"]) == [1, 2]
  largest = max(lr.buckets.question)
  assert shapes == [(32, largest)] * 4  # 2 datasets x 2 factors, one batch each
  assert rollout.compilation_count() - before == 1
