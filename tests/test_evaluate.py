"""Evaluation metrics on a stubbed generator, outputs on disk, and one tiny end-to-end
run (real model + char tokenizer) through ``evaluate`` and the ``generate`` command."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from colar_jax import cli, config
from colar_jax import evaluate as ev
from colar_jax.data import prompts
from colar_jax.decode import generate as gen
from colar_jax.decode import rollout
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.train import run as run_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTIONS = ["q0", "q1", "q2", "q3"]
ANSWERS = ["10", "11", "12", "13"]
RUN = config.from_config_dict(config.base_config())
# Unused by a stubbed generator, but evaluate's argument is a RolloutConfig.
STUB_RC = rollout.RolloutConfig(separator_id=4, eos_id=2)


def _correct(i: int, c: int, seed: int) -> bool:
  """Known pattern: question i is right iff i < (seed + c) % 4 + 1."""
  return i < (seed + c) % 4 + 1


def _stub(calls):
  def generate(questions, indices, c, seed):
    calls.append((list(indices), c, seed))
    out = []
    for i in indices:
      pred = ANSWERS[i] if _correct(i, c, seed) else "-1"
      out.append(gen.Generation(text=f"###Answer:{pred}", num_latent=2 * c + i, answer_length=3))
    return out

  return generate


def test_metrics_and_outputs_with_stubbed_generator(tmp_path):
  calls = []
  logs = []
  res = ev.evaluate(
    None,
    None,
    QUESTIONS,
    ANSWERS,
    "colar",
    [1, 2],
    [0, 1, 2],
    3,
    STUB_RC,
    run=RUN,
    out_dir=str(tmp_path),
    generate_fn=_stub(calls),
    progress=False,
    log=logs.append,
  )
  assert calls[:2] == [([0, 1, 2], 1, 0), ([3], 1, 0)]  # batch_size 3 -> [0,1,2] + [3]
  for c in (1, 2):
    per_seed = np.array([np.mean([_correct(i, c, s) for i in range(4)]) for s in (0, 1, 2)])
    m = res["factors"][c]
    assert m["accuracy"] == pytest.approx(per_seed.mean())
    ci = 1.96 * per_seed.std(ddof=1) / math.sqrt(3)
    assert m["accuracy_ci95"] == pytest.approx(ci)
    assert m["accuracy_per_seed"] == pytest.approx(list(per_seed))
    # Over questions: each question's accuracy averaged over the 3 seeds, then the
    # standard error over the 4 questions.
    per_q = [np.mean([_correct(i, c, s) for s in (0, 1, 2)]) for i in range(4)]
    q_ci = 1.96 * np.std(per_q, ddof=1) / math.sqrt(4)
    assert m["accuracy_ci95_questions"] == pytest.approx(q_ci)
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
  assert gen.reasoning_length([7, 8, 5, 9, 5], 5) == 2
  assert gen.reasoning_length([7, 8], 5) == 2
  calls = []
  res = ev.evaluate(
    None,
    None,
    QUESTIONS,
    ANSWERS,
    "cot",
    [1, 2, 5],
    2,
    8,
    STUB_RC,
    run=RUN,
    generate_fn=_stub(calls),
    progress=False,
    log=lambda s: None,
  )
  assert list(res["factors"]) == [1]  # the CoT prompt ignores c: evaluated once
  assert {c for _, c, _ in calls} == {1}
  with pytest.raises(ValueError):
    ev.evaluate(
      None,
      None,
      QUESTIONS,
      ANSWERS[:2],
      "colar",
      [1],
      1,
      2,
      STUB_RC,
      run=RUN,
      generate_fn=_stub([]),
    )
  with pytest.raises(ValueError, match=r"config\.method"):
    ev.evaluate(
      None, None, QUESTIONS, ANSWERS, "cocon", [1], 1, 2, STUB_RC, run=RUN, generate_fn=_stub([])
    )


@pytest.mark.usefixtures("restore_logging")
def test_cli_parsing_and_load_run():
  p = cli.parser()
  a = p.parse_args(
    ["eval", "--workdir=/w", "--dataset=gsm8k", "--source=/s", "--compression=1,2,5", "--seeds=3"]
  )
  assert (cli._factors(a.compression), a.seeds, a.split) == ([1, 2, 5], 3, "test")
  assert (a.workdir, a.dataset, a.source, a.config) == ("/w", "gsm8k", "/s", None)
  with pytest.raises(SystemExit, match="--compression"):  # before any run is loaded
    cli.main(["eval", "--workdir=/w", "--dataset=x", "--compression=a"])
  g = p.parse_args(["generate", "--workdir=/w", "--speed=3", "what", "is"])
  assert (g.speed, g.question) == (3, ["what", "is"])
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    run_lib.load_run("/nonexistent")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  texts = ["x=2;x*3?", "x=5;x+4?", "x=7;x-1?", "6", "9", "0"]
  tok = prompts.train_char_tokenizer(texts, tmp_path_factory.mktemp("tok"))
  mcfg = ModelConfig(
    vocab_size=len(tok),
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
  )
  c = config.base_config()
  c.rollout.max_latent_steps = 3
  c.rollout.max_new_tokens = 4
  c.rollout.greedy = True
  return run_lib.LoadedRun(
    model=CoLaRModel(mcfg, rngs=nnx.Rngs(0)),
    tokenizer=tok,
    run=config.from_config_dict(c),
    embed_std=0.02,
    meta=dict(checkpoint="/w/checkpoints/0", step=0),
  )


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_end_to_end_tiny_model(tiny_run, tmp_path, monkeypatch, capsys):
  """Real rollout + char tokenizer; batch_size 1 so the command below reuses the program."""
  lr = tiny_run
  res = ev.evaluate(
    lr.model,
    lr.tokenizer,
    ["x=2;x*3?", "x=5;x+4?"],
    ["6", "9"],
    "colar",
    [2],
    1,
    1,
    lr.rollout_config(),
    run=lr.run,
    out_dir=str(tmp_path),
    templates=lr.templates,
    buckets=lr.buckets,
    progress=False,
    log=lambda s: None,
    fixed_prompt_length=True,  # as `generate` pads: the command below reuses the program
  )
  recs = [json.loads(x) for x in (tmp_path / "eval_colar.jsonl").read_text().splitlines()]
  assert len(recs) == 2 and all(1 <= r["num_latent"] <= 3 for r in recs)
  assert all(1 <= r["answer_length"] <= 4 for r in recs)
  assert 0.0 <= res["factors"][2]["accuracy"] <= 1.0
  monkeypatch.setattr(cli, "load_run", lambda workdir: lr)
  before = rollout.compilation_count()
  cli.main(["generate", "--workdir=/w", "--speed=2", "x=2;x*3?"])
  assert rollout.compilation_count() == before  # same bucket + config: no recompile
  out = capsys.readouterr().out
  print(out)
  assert "latent steps:" in out and "answer:" in out
