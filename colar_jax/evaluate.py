"""Evaluation of a method across compression factors and seeds: metrics, CI, table, plot.

Per compression factor we report, as the paper does, accuracy mean +- 95% CI over seeds,
``1.96 * std / sqrt(n_seeds)``. The paper does not say which std; we use the SAMPLE std
(ddof=1), the usual estimate from a handful of runs (ddof=0 would shrink the interval by
sqrt(4/5) ~ 0.89 for 5 seeds); one seed -> CI 0. That interval is the sampling noise of
one model on these questions only; ``accuracy_ci95_questions`` is the 95% CI of the
accuracy as an estimate over the question distribution: 1.96 * the standard error over
questions of each question's accuracy averaged over the seeds (the clustered CLT interval
of Miller, "Adding Error Bars to Evals", arXiv 2411.00640). "#L on correct" is
``sum(correct * L) / sum(correct)`` per seed (as the reference), averaged over seeds;
answer length is the number of generated tokens including EOS (the reference's non-pad
output length). Decoding itself is :mod:`colar_jax.decode.generate`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from colar_jax import methods, paths
from colar_jax.data import prompts
from colar_jax.decode.generate import GenerateFn, answer_all, make_generate_fn
from colar_jax.decode.rollout import RolloutConfig
from colar_jax.train.logs import pct


def ci95(values: Sequence[float]) -> float:
  """1.96 * sample std / sqrt(n) (0 for fewer than two values)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return 0.0
  return float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def _summarise(correct: np.ndarray, lengths: np.ndarray, ans_len: np.ndarray) -> dict[str, Any]:
  """Metrics of one factor from [n_seeds, n_questions] arrays."""
  acc = correct.mean(axis=1)
  n_ok = correct.sum(axis=1)
  l_ok = np.where(n_ok > 0, (correct * lengths).sum(axis=1) / np.maximum(n_ok, 1), np.nan)
  return dict(
    accuracy=float(acc.mean()),
    accuracy_ci95=ci95(acc),
    accuracy_per_seed=[float(a) for a in acc],
    accuracy_ci95_questions=ci95(correct.mean(axis=0)),
    num_latent=float(lengths.mean()),
    num_latent_ci95=ci95(lengths.mean(axis=1)),
    num_latent_correct=(float(np.nanmean(l_ok)) if np.isfinite(l_ok).any() else float("nan")),
    answer_length=float(ans_len.mean()),
  )


def format_table(method: str, factors: dict[int, dict[str, Any]]) -> str:
  """Accuracy +- the CI over seeds, then (``+- q``) the CI over questions."""
  lines = [
    f"method={method}",
    f"{'c':>4} {'accuracy':>16} {'+- q':>6} {'#L':>8} {'#L(correct)':>12} {'ans len':>8}",
  ]
  for c, m in factors.items():
    acc = f"{100 * m['accuracy']:.2f}% +- {100 * m['accuracy_ci95']:.2f}"
    q = f"{100 * m.get('accuracy_ci95_questions', float('nan')):.2f}"
    lines.append(
      f"{c:>4} {acc:>16} {q:>6} {m['num_latent']:>8.2f} "
      f"{m['num_latent_correct']:>12.2f} {m['answer_length']:>8.2f}"
    )
  return "\n".join(lines)


def save_plot(path: str, method: str, factors: dict[int, dict[str, Any]]) -> None:
  """Accuracy (with 95% CI) against #L, one point per compression factor."""
  import matplotlib  # noqa: PLC0415 (the Agg backend must be chosen before pyplot loads)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  cs = list(factors)
  xs = [factors[c]["num_latent"] for c in cs]
  ys = [100 * factors[c]["accuracy"] for c in cs]
  es = [100 * factors[c]["accuracy_ci95"] for c in cs]
  fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
  ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
  for c, x, y in zip(cs, xs, ys):
    ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("#L (reasoning chain length)")
  ax.set_ylabel("accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()  # a URL too (savefig would open it as a local file)
  fig.savefig(buf, format="png")
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())


class _RunningAccuracy:
  """Shows a factor's running accuracy and #L on the progress bar, from the batches
  :func:`answer_all` has scored (``on_batch``)."""

  def __init__(self, bar: Any, factor: int) -> None:
    self.bar, self.factor = bar, factor
    self.correct, self.answered, self.latents = 0, 0, 0.0

  def __call__(self, seed: int) -> Callable[[Sequence[Any], np.ndarray], None]:
    def on_batch(gens: Sequence[Any], correct: np.ndarray) -> None:
      self.correct += int(correct.sum())
      self.answered += len(gens)
      self.latents += sum(g.num_latent for g in gens)
      n = max(self.answered, 1)
      self.bar.set_postfix_str(
        f"c={self.factor} seed={seed} acc={pct(self.correct / n)} #L={self.latents / n:.1f}",
        refresh=False,
      )
      self.bar.update(1)

    return on_batch


def evaluate(
  model: Any,
  tokenizer: Any,
  questions: Sequence[str],
  answers: Sequence[str],
  method: str,
  compression_factors: Sequence[int],
  seeds: int | Sequence[int],
  batch_size: int,
  rollout_cfg: RolloutConfig | None,
  *,
  run: Any,
  out_dir: str | None = None,
  generate_fn: GenerateFn | None = None,
  templates: prompts.PromptTemplates | None = None,
  buckets: prompts.Buckets | None = None,
  answer_kind: str = "number",
  progress: bool = True,
  log: Callable[[str], None] = print,
  name: str | None = None,
  extra: dict[str, Any] | None = None,
  bucket_choices: int = 1,
  fixed_prompt_length: bool = False,
) -> dict[str, Any]:
  """Accuracy / #L / answer length per compression factor, mean and CI over seeds.

  ``run`` is the typed run config (the method's rollout overrides read it).
  ``generate_fn`` replaces the model-based generator (tests stub it). Methods whose
  prompt ignores c (all but CoLaR) are evaluated once, under the first factor.
  With ``out_dir``: ``<name>.jsonl`` (one record per question, factor and seed),
  ``<name>.json`` (the returned summary, plus ``extra``) and ``<name>.png``; ``name``
  defaults to ``eval_<method>``. ``extra``'s ``checkpoint`` and ``step`` (what was
  evaluated) also go into every JSONL record and head the printed table.
  ``bucket_choices`` / ``fixed_prompt_length``: the decoder's batch and prompt shapes
  (:func:`colar_jax.decode.generate.make_generate_fn`); ``eval`` sizes short batches to
  the work (4 choices) and pads every prompt to the largest question bucket, so one
  program serves every factor, seed and dataset of a batch shape.
  """
  if len(questions) != len(answers):
    raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
  spec = methods.get(method).prompt
  templates = templates or prompts.PromptTemplates()
  factors = [int(c) for c in compression_factors]
  if not spec.uses_factor:
    factors = factors[:1]
  seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
  if generate_fn is None:
    generate_fn = make_generate_fn(
      model,
      tokenizer,
      method,
      rollout_cfg,
      run=run,
      batch_size=batch_size,
      templates=templates,
      buckets=buckets,
      bucket_choices=bucket_choices,
      fixed_prompt_length=fixed_prompt_length,
    )
  stamp = {k: extra[k] for k in ("checkpoint", "step") if extra and k in extra}
  n = len(questions)
  n_batches = -(-n // batch_size) if n else 0
  records: list[dict[str, Any]] = []
  summary: dict[int, dict[str, Any]] = {}
  bar = tqdm(
    total=len(factors) * len(seed_list) * n_batches, desc=f"eval {method}", disable=not progress
  )
  for c in factors:
    correct = np.zeros((len(seed_list), n))
    lengths = np.zeros((len(seed_list), n))
    ans_len = np.zeros((len(seed_list), n))
    running = _RunningAccuracy(bar, c)
    for si, seed in enumerate(seed_list):
      sc = answer_all(
        generate_fn,
        questions,
        answers,
        factor=c,
        seed=seed,
        batch_size=batch_size,
        answer_prefix=templates.answer_prefix,
        answer_kind=answer_kind,
        on_batch=running(seed),
      )
      correct[si], lengths[si], ans_len[si] = sc.correct, sc.num_latent, sc.answer_length
      for i, g in enumerate(sc.generations):
        records.append(
          dict(
            index=i,
            compression_factor=c,
            seed=seed,
            question=questions[i],
            answer=answers[i],
            output=g.text,
            prediction=sc.predictions[i],
            correct=bool(sc.correct[i]),
            num_latent=g.num_latent,
            answer_length=g.answer_length,
            **stamp,
          )
        )
    summary[c] = _summarise(correct, lengths, ans_len)
  bar.close()
  if stamp:
    log(f"checkpoint {stamp.get('checkpoint')} (step {stamp.get('step')})")
  log(format_table(method, summary))
  result: dict[str, Any] = dict(
    method=method, num_questions=n, seeds=seed_list, factors=summary, **(extra or {})
  )
  if out_dir:
    paths.makedirs(out_dir)
    stem = paths.join(out_dir, name or f"eval_{method}")
    paths.write_text(stem + ".jsonl", "".join(json.dumps(r) + "\n" for r in records))
    save_plot(stem + ".png", method, summary)
    result.update(jsonl=stem + ".jsonl", plot=stem + ".png", summary=stem + ".json")
    paths.write_text(stem + ".json", json.dumps(result, indent=2, default=str))
  return result
