"""Answer questions with a trained run from the command line.

``python -m colar_jax.generate --workdir=DIR --speed=3 "question"`` prints the decoded
output, the extracted answer and the number of latent steps (reasoning tokens for CoT);
``--interactive`` reads questions from stdin until EOF / an empty line. Decoding is the
evaluation rollout (same prompts, same jitted program: one compile, then fast).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from colar_jax.data import answers as answer_lib
from colar_jax.data import prompts
from colar_jax.evaluate import Generation, load_run, make_generate_fn


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m colar_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("question", nargs="*", help="question text (several words are joined)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--speed", type=int, default=1, help="compression factor c of the prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--greedy", action="store_true", help="greedy answer decoding")
  p.add_argument("--method", default=None, help="default: the run's method")
  p.add_argument("--interactive", action="store_true", help="read questions from stdin")
  args = p.parse_args(argv)
  if not args.interactive and not args.question:
    p.error("give a question or --interactive")
  if args.speed < 1:
    p.error("--speed must be >= 1")
  return args


def format_generation(g: Generation, answer_prefix: str = "Answer:") -> str:
  pred = answer_lib.extract_answer(g.text, answer_prefix)
  return f"output: {g.text}\nanswer: {pred}\nlatent steps: {g.num_latent}"


def _questions(args: argparse.Namespace, stdin: Iterable[str]) -> Iterable[str]:
  if args.question:
    yield " ".join(args.question)
  if args.interactive:
    for line in stdin:
      if not line.strip():
        return
      yield line.strip()


def main(argv: Sequence[str] | None = None, stdin: Iterable[str] | None = None) -> None:
  args = parse_args(argv)
  run: Any = load_run(args.workdir)
  c = run.config
  templates, rc = run.templates, run.rollout_config(greedy=args.greedy)
  gen = make_generate_fn(run.model, run.tokenizer, args.method or run.method, rc,
                         batch_size=1, templates=templates, run_config=c,
                         buckets=prompts.Buckets(question=tuple(c.data.question_buckets)))
  for i, q in enumerate(_questions(args, stdin if stdin is not None else sys.stdin)):
    (g,) = gen([q], [i], args.speed, args.seed)
    print(format_generation(g, templates.answer_prefix), flush=True)


if __name__ == "__main__":
  main()
