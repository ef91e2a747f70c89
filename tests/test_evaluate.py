"""Evaluation metrics on a stubbed generator, outputs on disk, and one tiny end-to-end
run (real model + char tokenizer) through ``evaluate`` and the ``generate`` CLI."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from colar_jax import configlib
from colar_jax import evaluate as ev
from colar_jax import generate as gen_cli
from colar_jax import rollout
from colar_jax.data import prompts
from colar_jax.model import CoLaRModel, ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTIONS = ["q0", "q1", "q2", "q3"]
ANSWERS = ["10", "11", "12", "13"]


def _correct(i: int, c: int, seed: int) -> bool:
  """Known pattern: question i is right iff i < (seed + c) % 4 + 1."""
  return i < (seed + c) % 4 + 1


def _stub(calls):
  def generate(questions, indices, c, seed):
    calls.append((list(indices), c, seed))
    out = []
    for i in indices:
      pred = ANSWERS[i] if _correct(i, c, seed) else "-1"
      out.append(ev.Generation(text=f"###Answer:{pred}", num_latent=2 * c + i,
                               answer_length=3))
    return out
  return generate


def test_metrics_and_outputs_with_stubbed_generator(tmp_path):
  calls = []
  logs = []
  res = ev.evaluate(None, None, QUESTIONS, ANSWERS, "colar", [1, 2], [0, 1, 2], 3, None, 1.0,
                    out_dir=str(tmp_path), generate_fn=_stub(calls), progress=False,
                    log=logs.append)
  assert calls[:2] == [([0, 1, 2], 1, 0), ([3], 1, 0)]  # batch_size 3 -> [0,1,2] + [3]
  for c in (1, 2):
    per_seed = np.array([np.mean([_correct(i, c, s) for i in range(4)]) for s in (0, 1, 2)])
    m = res["factors"][c]
    assert m["accuracy"] == pytest.approx(per_seed.mean())
    ci = 1.96 * per_seed.std(ddof=1) / math.sqrt(3)
    assert m["accuracy_ci95"] == pytest.approx(ci)
    assert m["num_latent"] == pytest.approx(2 * c + 1.5)
    l_ok = [np.mean([2 * c + i for i in range(4) if _correct(i, c, s)]) for s in (0, 1, 2)]
    assert m["num_latent_correct"] == pytest.approx(np.mean(l_ok))
    assert m["answer_length"] == 3
  lines = (tmp_path / "eval_colar.jsonl").read_text().splitlines()
  assert len(lines) == 2 * 3 * 4
  rec = json.loads(lines[0])
  assert rec["prediction"] == "10" and rec["correct"] is True and rec["num_latent"] == 2
  assert (tmp_path / "eval_colar.png").read_bytes()[:8] == PNG_MAGIC
  assert json.loads((tmp_path / "eval_colar.json").read_text())["num_questions"] == 4
  assert "accuracy" in logs[0] and len(logs[0].splitlines()) == 4


def test_helpers():
  assert ev.ci95([0.5]) == 0.0
  assert ev.ci95([0.0, 1.0]) == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2))
  assert ev.reasoning_length([7, 8, 5, 9, 5], 5) == 2
  assert ev.reasoning_length([7, 8], 5) == 2
  calls = []
  res = ev.evaluate(None, None, QUESTIONS, ANSWERS, "cot", [1, 2, 5], 2, 8, None, 1.0,
                    generate_fn=_stub(calls), progress=False, log=lambda s: None)
  assert list(res["factors"]) == [1]  # the CoT prompt ignores c: evaluated once
  with pytest.raises(ValueError):
    ev.evaluate(None, None, QUESTIONS, ANSWERS[:2], "colar", [1], 1, 2, None, 1.0,
                generate_fn=_stub([]))


def test_cli_parsing_and_load_run():
  a = ev.parse_args(["--workdir=/w", "--dataset=gsm8k", "--source=/s", "--compression=1,2,5",
                     "--seeds=3"])
  assert (a.compression, a.seeds, a.split) == ([1, 2, 5], 3, "test")
  with pytest.raises(SystemExit):
    ev.parse_args(["--workdir=/w", "--dataset=x", "--compression=a"])
  g = gen_cli.parse_args(["--workdir=/w", "--speed=3", "what", "is"])
  assert (g.speed, g.question) == (3, ["what", "is"])
  try:
    import colar_jax.checkpointing  # noqa: F401
  except ImportError:
    with pytest.raises(NotImplementedError):
      ev.load_run("/nonexistent")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  texts = ["x=2;x*3?", "x=5;x+4?", "x=7;x-1?", "6", "9", "0"]
  tok = prompts.train_char_tokenizer(texts, tmp_path_factory.mktemp("tok"))
  mcfg = ModelConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, intermediate_size=128)
  c = configlib.base_config()
  c.rollout.max_latent_steps = 3
  c.rollout.max_new_tokens = 4
  c.rollout.greedy = True
  return ev.Run(model=CoLaRModel(mcfg, rngs=nnx.Rngs(0)), tokenizer=tok, config=c,
                embed_std=0.02)


def test_end_to_end_tiny_model(tiny_run, tmp_path, monkeypatch, capsys):
  """Real rollout + char tokenizer; batch_size 1 so the CLI below reuses the program."""
  run = tiny_run
  res = ev.evaluate(run.model, run.tokenizer, ["x=2;x*3?", "x=5;x+4?"], ["6", "9"], "colar",
                    [2], 1, 1, run.config.rollout, run.embed_std, out_dir=str(tmp_path),
                    progress=False, log=lambda s: None)
  recs = [json.loads(x) for x in (tmp_path / "eval_colar.jsonl").read_text().splitlines()]
  assert len(recs) == 2 and all(1 <= r["num_latent"] <= 3 for r in recs)
  assert all(1 <= r["answer_length"] <= 4 for r in recs)
  assert 0.0 <= res["factors"][2]["accuracy"] <= 1.0
  monkeypatch.setattr(gen_cli, "load_run", lambda workdir: run)
  before = rollout.compilation_count()
  gen_cli.main(["--workdir=/w", "--speed=2", "x=2;x*3?"])
  assert rollout.compilation_count() == before  # same bucket + config: no recompile
  out = capsys.readouterr().out
  print(out)
  assert "latent steps:" in out and "answer:" in out
