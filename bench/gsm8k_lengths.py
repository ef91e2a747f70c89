"""Token lengths of GSM8k's parts under a tokenizer: what configs/smollm2_gsm8k.py's fixed
shapes (question / steps / answer buckets, rollout.max_new_tokens) are chosen from.

  python bench/gsm8k_lengths.py [--tokenizer .cache/smollm2_orbax] [--data ../shared/data/gsm8k]

Per split: percentiles of the question prompt (CoLaR's, with the speed and ###), the
chain, the answer (+ EOS), a CoT output (chain + answer + EOS) and the chain at c = 2..5,
and how many rows exceed each candidate length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from colar_jax.data import parsers, prompts
from colar_jax.methods.encoding import chain_text

LIMITS = (64, 96, 112, 128, 160, 192)


def row(name: str, xs: list[int]) -> str:
  v = np.asarray(xs)
  p = np.percentile(v, [50, 90, 95, 99])
  over = " ".join(f">{b}:{int((v > b).sum())}" for b in LIMITS)
  return f"{name:22s} n={v.size} p50 {p[0]:.0f} p90 {p[1]:.0f} p95 {p[2]:.0f} p99 {p[3]:.0f} max {v.max()}  {over}"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokenizer", default=".cache/smollm2_orbax")
  ap.add_argument("--data", default="../shared/data/gsm8k")
  a = ap.parse_args()
  tok = prompts.load_tokenizer(a.tokenizer, pad_as_eos=True)
  t = prompts.PromptTemplates()
  for split in ("train.jsonl", "test.jsonl"):
    recs = list(parsers.read_gsm8k_jsonl(Path(a.data) / split))
    n = len(recs)
    texts = [t.question_text(r.question, 5) + t.separator for r in recs]
    texts += [chain_text(t, r.steps, True) for r in recs]
    texts += [t.answer_text(r.answer) for r in recs]
    toks, _ = prompts.encode_with_separator(tok, texts, t.separator)
    q, s, ans = ([len(x) for x in toks[i * n : (i + 1) * n]] for i in range(3))
    print(split)
    print(row("question+speed+###", q))
    print(row("chain", s))
    print(row("answer+EOS", [x + 1 for x in ans]))
    print(row("CoT output", [x + y + 1 for x, y in zip(s, ans)]))
    for c in (2, 3, 4, 5):
      print(row(f"chain / {c}", [-(-x // c) for x in s]))


if __name__ == "__main__":
  main()
