"""#L of the token methods (CoT, No-CoT, iCoT): the reasoning a decoded output holds.

CoT's prompt ends with the separator, so its output is ``chain ### Answer:..``; No-CoT's
and iCoT's does not, so their outputs open with one. The outputs fed here are what a
perfect model of each method emits: the tokens its training batch puts after the
prompt, returned by a stub in place of the jitted rollout.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from flax import nnx

from colar_jax import config, methods
from colar_jax.data.prompts import (
  Buckets,
  PromptTemplates,
  Speed,
  char_tokenizer_corpus,
  separator_id,
  train_char_tokenizer,
)
from colar_jax.data.synthetic import make_record
from colar_jax.decode import generate as gen
from colar_jax.methods.base import EncodeContext
from colar_jax.train.run import rollout_config

T = PromptTemplates()
RECS = [
  make_record(2, [("*", 3), ("-", 2), ("-", 8), ("-", 7)], 10),  # 4 steps
  make_record(5, [("+", 1), ("*", 4), ("+", 3)], 10),  # 3 steps
  make_record(7, [("+", 2)], 10),  # 1 step: nothing is left at stage 1
]
CUR = config.Curriculum(epochs_per_stage=1, start_stage=1, max_stage=3)
RUN = dataclasses.replace(
  config.Run(), baselines=dataclasses.replace(config.Run().baselines, icot=CUR)
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_char_tokenizer(char_tokenizer_corpus(RECS), tmp_path_factory.mktemp("tok"))


def chain_chars(steps) -> int:
  """#L of a chain for the char tokenizer: one token per character of the joined steps."""
  return len(T.step_joiner.join(steps))


class _Empty(nnx.Module):
  pass


def decode_targets(tok, method: str, stage: int, monkeypatch) -> list[gen.Generation]:
  """What ``make_generate_fn`` reports when the rollout emits the method's training target
  (steps part + answer part; for CoT without the steps part's leading separator, which
  is the last token of its prompt)."""
  sep = separator_id(tok, T)
  ctx = EncodeContext(tok, T, Buckets())
  b = methods.get(method).encode(RUN, RECS, ctx, speed=Speed(1), stage=stage)
  rows = []
  for i in range(len(RECS)):
    steps = b["steps_ids"][i][b["steps_mask"][i].astype(bool)].tolist()
    answer = b["answer_ids"][i][b["answer_mask"][i].astype(bool)].tolist()
    if methods.get(method).prompt.separator:
      assert steps[0] == sep
      steps = steps[1:]
    rows.append(steps + answer)
  width = max(map(len, rows))
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, True
  stub = types.SimpleNamespace(
    answer_ids=ids, answer_mask=mask, num_latents=np.zeros(len(rows), np.int32)
  )
  monkeypatch.setattr(gen, "rollout", lambda *a, **k: stub)
  rc = rollout_config(RUN.rollout, tok, T, 1.0)
  fn = gen.make_generate_fn(_Empty(), tok, method, rc, batch_size=len(RECS), run=RUN, templates=T)
  out = fn([r.question for r in RECS], list(range(len(RECS))), 1, 0)
  assert [g.text for g in out] == [tok.decode(r, skip_special_tokens=True) for r in rows]
  return out


def test_icot_intermediate_stage_counts_the_kept_steps(tok, monkeypatch):
  """Stage 1 of 3 removes the first step; the rest is generated between two separators
  (``###s2\\ns3###Answer:a``). It used to read 0: the output starts with ``###``."""
  got = [g.num_latent for g in decode_targets(tok, "icot", 1, monkeypatch)]
  assert got == [chain_chars(r.steps[1:]) for r in RECS] == [17, 11, 0]
  assert got[0] > 0
  got = [g.num_latent for g in decode_targets(tok, "icot", 2, monkeypatch)]
  assert got == [chain_chars(r.steps[2:]) for r in RECS] == [11, 5, 0]


def test_icot_final_stage_and_nocot_have_no_chain(tok, monkeypatch):
  for method, stage in (("icot", 3), ("nocot", 0)):
    gens = decode_targets(tok, method, stage, monkeypatch)
    assert all(g.text.startswith("###Answer:") for g in gens)
    assert [g.num_latent for g in gens] == [0, 0, 0], method


def test_cot_counts_the_whole_chain(tok, monkeypatch):
  got = [g.num_latent for g in decode_targets(tok, "cot", 0, monkeypatch)]
  assert got == [chain_chars(r.steps) for r in RECS] == [23, 17, 5]


def test_reasoning_length_rules():
  sep, ans = 9, [1, 2]  # ans: the tokens "Answer:..." (is_answer below)

  def is_answer(rest):
    return list(rest[:2]) == ans

  # CoT (the prompt ends with the separator): tokens before the first one.
  assert gen.reasoning_length([5, 6, 7, sep, *ans], sep) == 3
  assert gen.reasoning_length([sep, *ans], sep) == 0
  assert gen.reasoning_length([5, 6], sep, is_answer=is_answer) == 2  # cut off mid-chain
  assert gen.reasoning_length([*ans, 3], sep, is_answer=is_answer) == 0  # answered at once
  # No-CoT / iCoT: the output's own leading separator opens the chain.
  kw = dict(opened=False, is_answer=is_answer)
  assert gen.reasoning_length([sep, 5, 6, sep, *ans], sep, **kw) == 2
  assert gen.reasoning_length([sep, *ans, 3], sep, **kw) == 0
  assert gen.reasoning_length([sep, 5, 6, 7], sep, **kw) == 3  # never reached the answer
  assert gen.reasoning_length([5, 6, sep, *ans], sep, **kw) == 2  # no opening separator
