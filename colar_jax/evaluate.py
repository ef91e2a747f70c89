"""Evaluation of any method across compression factors and seeds (library + CLI).

Every method is decoded by the same jitted rollout (``rollout.py``); only the prompt
and the latent mode differ (:data:`METHOD_SPECS`, following the reference's
``eval_generation``). Per compression factor we report, as the paper does, accuracy
mean +- 95% CI over seeds, ``1.96 * std / sqrt(n_seeds)``. The paper does not say
which std; we use the SAMPLE std (ddof=1), the usual estimate from a handful of runs
(ddof=0 would shrink the interval by sqrt(4/5) ~ 0.89 for 5 seeds); one seed -> CI 0.

Chain length #L: latent steps for latent methods; for token methods (CoT) the
number of generated tokens before the first separator (all tokens if none; the
reference's ``index(###) - 1`` subtracts one more token, a template artefact we do
not copy). "#L on correct" is ``sum(correct * L) / sum(correct)`` per seed (as the
reference), averaged over seeds; answer length is the number of generated tokens
including EOS (the reference's non-pad output length).

CLI: ``python -m colar_jax.evaluate --workdir=DIR --dataset=NAME --source=PATH
[--compression=1,2,5] [--seeds=5] [--split=test]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from colar_jax.data import answers as answer_lib
from colar_jax.data import prompts
from colar_jax.rollout import RolloutConfig, rollout


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """How a method is prompted and decoded.

  ``speed``: "factor" (the compression factor under evaluation), a fixed value, or
  None (no speed suffix). ``fixed_latents``: latent count of fixed-length methods.
  """

  latent_mode: str
  speed: int | str | None
  prompt_separator: bool
  fixed_latents: int | None = None

  @property
  def uses_factor(self) -> bool:
    return self.speed == "factor"


METHOD_SPECS: dict[str, MethodSpec] = {
    "colar": MethodSpec("sampled", "factor", True),
    # Reference: 6 latents, "(Thinking speed: auto)###" prompt.
    "coconut": MethodSpec("hidden", "auto", True, fixed_latents=6),
    "distill": MethodSpec("hidden", "auto", True, fixed_latents=6),
    # Reference text_generate: CoT prompts end with "(Thinking speed: 1)###".
    "cot": MethodSpec("none", 1, True),
    "icot": MethodSpec("none", None, False),
    "nocot": MethodSpec("none", None, False),
}


@dataclasses.dataclass(frozen=True)
class Generation:
  """One decoded output: text (special tokens removed), chain length, token count."""

  text: str
  num_latent: int
  answer_length: int


# (questions, dataset indices, compression factor, seed) -> one Generation per question.
GenerateFn = Callable[[Sequence[str], Sequence[int], int, int], list[Generation]]


def reasoning_length(ids: Sequence[int], separator_id: int) -> int:
  """Tokens before the first separator (all of them when there is none)."""
  ids = list(ids)
  return ids.index(separator_id) if separator_id in ids else len(ids)


def ci95(values: Sequence[float]) -> float:
  """1.96 * sample std / sqrt(n) (0 for fewer than two values)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return 0.0
  return float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def method_rollout_config(base: RolloutConfig, method: str, *, run_config: Any = None,
                          model_cfg: Any = None) -> RolloutConfig:
  """The rollout that decodes ``method``. Baselines defer to their own package
  (number of thoughts from the run's ``baselines`` config, ``latent_proj`` when the
  model has one) so training and evaluation can never disagree."""
  from colar_jax import baselines
  if method in baselines.BASELINE_METHODS:
    bcfg = (baselines.BaselineConfig.from_config(run_config) if run_config is not None
            else baselines.BaselineConfig())
    return baselines.eval_rollout_config(base, method, bcfg, model_cfg)
  spec = METHOD_SPECS[method]
  kw: dict[str, Any] = dict(latent_mode=spec.latent_mode)
  if spec.fixed_latents is not None:
    kw["max_latent_steps"] = spec.fixed_latents
  return base.replace(**kw)


def make_generate_fn(model: Any, tokenizer: Any, method: str, rollout_cfg: RolloutConfig, *,
                     batch_size: int, templates: prompts.PromptTemplates | None = None,
                     buckets: prompts.Buckets | None = None,
                     run_config: Any = None) -> GenerateFn:
  """A GenerateFn decoding with the jitted rollout.

  The model is split ONCE here. Batches are padded to exactly ``batch_size`` rows (so
  the last, short batch reuses the same program) and prompts to the data buckets;
  dataset indices are the RNG row ids, so a question's sample does not depend on the
  batch it lands in.
  """
  import jax
  from flax import nnx

  if method not in METHOD_SPECS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHOD_SPECS)}")
  spec = METHOD_SPECS[method]
  templates = templates or prompts.PromptTemplates()
  buckets = buckets or prompts.Buckets()
  cfg = method_rollout_config(rollout_cfg, method, run_config=run_config,
                              model_cfg=getattr(model, "cfg", None))
  graphdef, state = nnx.split(model)

  def generate(questions: Sequence[str], indices: Sequence[int], factor: int,
               seed: int) -> list[Generation]:
    speed = factor if spec.uses_factor else spec.speed
    enc = prompts.encode_prompt_batch(list(questions), tokenizer, templates, speed, buckets,
                                      append_separator=spec.prompt_separator)
    out = rollout(graphdef, state, enc["question_ids"], enc["question_mask"],
                  jax.random.key(seed), cfg, row_ids=np.asarray(indices, np.int32),
                  batch_buckets=(batch_size,))
    ids, mask, n_lat = jax.device_get((out.answer_ids, out.answer_mask, out.num_latents))
    gens = []
    for i in range(len(questions)):
      row = ids[i][mask[i]].tolist()
      n = reasoning_length(row, cfg.separator_id) if spec.latent_mode == "none" else int(n_lat[i])
      text = tokenizer.decode(row, skip_special_tokens=True)
      gens.append(Generation(text=text, num_latent=n, answer_length=len(row)))
    return gens

  return generate


def _summarise(correct: np.ndarray, lengths: np.ndarray, ans_len: np.ndarray) -> dict[str, Any]:
  """Metrics of one factor from [n_seeds, n_questions] arrays."""
  acc = correct.mean(axis=1)
  n_ok = correct.sum(axis=1)
  l_ok = np.where(n_ok > 0, (correct * lengths).sum(axis=1) / np.maximum(n_ok, 1), np.nan)
  return dict(
      accuracy=float(acc.mean()), accuracy_ci95=ci95(acc),
      accuracy_per_seed=[float(a) for a in acc],
      num_latent=float(lengths.mean()), num_latent_ci95=ci95(lengths.mean(axis=1)),
      num_latent_correct=(float(np.nanmean(l_ok)) if np.isfinite(l_ok).any() else float("nan")),
      answer_length=float(ans_len.mean()))


def format_table(method: str, factors: dict[int, dict[str, Any]]) -> str:
  lines = [f"method={method}",
           f"{'c':>4} {'accuracy':>16} {'#L':>8} {'#L(correct)':>12} {'ans len':>8}"]
  for c, m in factors.items():
    acc = f"{100 * m['accuracy']:.2f} +- {100 * m['accuracy_ci95']:.2f}"
    lines.append(f"{c:>4} {acc:>16} {m['num_latent']:>8.2f} "
                 f"{m['num_latent_correct']:>12.2f} {m['answer_length']:>8.2f}")
  return "\n".join(lines)


def save_plot(path: str, method: str, factors: dict[int, dict[str, Any]]) -> None:
  """Accuracy (with 95% CI) against #L, one point per compression factor."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
  fig.savefig(path, format="png")
  plt.close(fig)


def evaluate(model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str],
             method: str, compression_factors: Sequence[int], seeds: int | Sequence[int],
             batch_size: int, rollout_cfg: RolloutConfig | Any, embed_std: float, *,
             out_dir: str | None = None, generate_fn: GenerateFn | None = None,
             templates: prompts.PromptTemplates | None = None,
             buckets: prompts.Buckets | None = None, answer_kind: str = "number",
             progress: bool = True, log: Callable[[str], None] = print,
             run_config: Any = None, name: str | None = None) -> dict[str, Any]:
  """Accuracy / #L / answer length per compression factor, mean and CI over seeds.

  ``rollout_cfg``: a :class:`RolloutConfig`, or the ``c.rollout`` ConfigDict (then the
  separator / EOS / pad ids come from ``tokenizer`` and ``embed_std`` is used).
  ``generate_fn`` replaces the model-based generator (tests stub it). Methods whose
  prompt ignores c (all but CoLaR) are evaluated once, under the first factor.
  With ``out_dir``: ``<name>.jsonl`` (one record per question, factor and seed),
  ``<name>.json`` (the returned summary) and ``<name>.png``; ``name`` defaults to
  ``eval_<method>`` (the CLI uses ``<dataset>_<split>`` under ``<workdir>/eval``).
  """
  if len(questions) != len(answers):
    raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
  if method not in METHOD_SPECS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHOD_SPECS)}")
  templates = templates or prompts.PromptTemplates()
  factors = [int(c) for c in compression_factors]
  if not METHOD_SPECS[method].uses_factor:
    factors = factors[:1]
  seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
  if generate_fn is None:
    if not isinstance(rollout_cfg, RolloutConfig):
      rollout_cfg = RolloutConfig.from_config(
          rollout_cfg, separator_id=prompts.separator_id(tokenizer, templates),
          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, embed_std=embed_std)
    generate_fn = make_generate_fn(model, tokenizer, method, rollout_cfg, run_config=run_config,
                                   batch_size=batch_size, templates=templates, buckets=buckets)
  n = len(questions)
  starts = list(range(0, n, batch_size))
  records: list[dict[str, Any]] = []
  summary: dict[int, dict[str, Any]] = {}
  from tqdm.auto import tqdm

  bar = tqdm(total=len(factors) * len(seed_list) * len(starts), desc=f"eval {method}",
             disable=not progress)
  for c in factors:
    correct = np.zeros((len(seed_list), n))
    lengths = np.zeros((len(seed_list), n))
    ans_len = np.zeros((len(seed_list), n))
    for si, seed in enumerate(seed_list):
      for s in starts:
        idx = list(range(s, min(s + batch_size, n)))
        gens = generate_fn([questions[i] for i in idx], idx, c, seed)
        for i, g in zip(idx, gens):
          pred = answer_lib.extract_answer(g.text, templates.answer_prefix)
          ok = bool(answer_lib.is_correct(pred, answers[i], answer_kind))
          correct[si, i], lengths[si, i], ans_len[si, i] = ok, g.num_latent, g.answer_length
          records.append(dict(index=i, compression_factor=c, seed=seed, question=questions[i],
                              answer=answers[i], output=g.text, prediction=pred,
                              correct=ok, num_latent=g.num_latent,
                              answer_length=g.answer_length))
        bar.update(1)
    summary[c] = _summarise(correct, lengths, ans_len)
  bar.close()
  log(format_table(method, summary))
  result: dict[str, Any] = dict(method=method, num_questions=n, seeds=seed_list,
                                factors=summary)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or f"eval_{method}")
    with open(stem + ".jsonl", "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    save_plot(stem + ".png", method, summary)
    result.update(jsonl=stem + ".jsonl", plot=stem + ".png", summary=stem + ".json")
    with open(stem + ".json", "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


# ----------------------------------------------------------------------------
# Loading a trained run (checkpointing.load_run)
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """What evaluation / generation need from a training run."""

  model: Any
  tokenizer: Any
  config: Any  # the run's ml_collections ConfigDict
  embed_std: float

  @property
  def method(self) -> str:
    return str(self.config.method)

  @property
  def templates(self) -> prompts.PromptTemplates:
    return prompts.PromptTemplates.from_run_config(self.config)

  def rollout_config(self, *, greedy: bool = False) -> RolloutConfig:
    """The run's ``rollout.*`` settings plus its tokenizer's separator / EOS / pad."""
    return RolloutConfig.from_config(
        self.config.rollout, separator_id=prompts.separator_id(self.tokenizer, self.templates),
        eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
        embed_std=self.embed_std, **({"greedy": True} if greedy else {}))


def load_run(workdir: str) -> Run:
  """Restores model, tokenizer and config of the run in ``workdir``."""
  try:
    from colar_jax import checkpointing  # noqa: F401
  except ImportError:
    raise NotImplementedError(
        "load_run: colar_jax/checkpointing.py does not exist yet; evaluation of a saved "
        f"run ({workdir}) is wired once the checkpoint format lands") from None
  if hasattr(checkpointing, "load_run"):
    return checkpointing.load_run(workdir)
  raise NotImplementedError("load_run: wire colar_jax.checkpointing's restore here")


def load_questions(dataset: str, split: str, *, data_dir: str, source: str | None = None,
                   run_config: Any = None) -> tuple[list[str], list[str]]:
  """(questions, gold answers) of a split, preparing the tfds dataset once if needed.

  For ``synthetic`` the task parameters come from the run's ``data.synthetic`` (the
  builder default is a different task, hence a different test set)."""
  from colar_jax.data import builders
  from colar_jax.data.records import Record

  cfg = None
  if dataset == "synthetic" and run_config is not None:
    from colar_jax.train_sft import synthetic_task
    cfg = builders.synthetic_config(synthetic_task(run_config))
  builders.prepare(dataset, data_dir, source=source, config=cfg)
  recs = [Record.from_example(ex)
          for ex in builders.load_source(dataset, data_dir, split, config=cfg)]
  return [r.question for r in recs], [r.answer for r in recs]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m colar_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory (checkpoint, config)")
  p.add_argument("--dataset", required=True, help="dataset name (colar_jax.data.builders)")
  p.add_argument("--source", default=None, help="folder with the raw source files")
  p.add_argument("--data_dir", default=None, help="tfds data dir (default: run config)")
  p.add_argument("--split", default="test")
  p.add_argument("--compression", default="1,2,3,4,5", help="comma list of factors")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=None, help="default: data.eval_batch_size")
  p.add_argument("--max_examples", type=int, default=0, help="0 = the whole split")
  p.add_argument("--method", default=None, help="default: the run's method")
  p.add_argument("--out_dir", default=None, help="default: WORKDIR/eval (files <dataset>_<split>.*)")
  p.add_argument("--answer_kind", default=None, choices=("number", "math"),
                 help="default: math for the 'math' dataset, else number")
  p.add_argument("--greedy", action="store_true", help="greedy answer decoding")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)
  try:
    args.compression = [int(x) for x in args.compression.split(",") if x.strip()]
  except ValueError:
    p.error(f"--compression: {args.compression!r} is not a comma list of ints")
  if not args.compression or min(args.compression) < 1 or args.seeds < 1:
    p.error("--compression factors and --seeds must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  run = load_run(args.workdir)
  c = run.config
  data_dir = args.data_dir or c.data.get("data_dir", "") or os.path.join(
      os.path.dirname(os.path.abspath(args.workdir)), "data")
  questions, golds = load_questions(args.dataset, args.split, data_dir=data_dir,
                                    source=args.source, run_config=c)
  if args.max_examples:
    questions, golds = questions[:args.max_examples], golds[:args.max_examples]
  templates, rc = run.templates, run.rollout_config(greedy=args.greedy)
  return evaluate(
      run.model, run.tokenizer, questions, golds, args.method or run.method,
      args.compression, args.seeds, args.batch_size or c.data.eval_batch_size, rc,
      run.embed_std, out_dir=args.out_dir or os.path.join(args.workdir, "eval"),
      name=f"{args.dataset}_{args.split}", run_config=c,
      templates=templates, buckets=prompts.Buckets(question=tuple(c.data.question_buckets)),
      answer_kind=args.answer_kind or ("math" if args.dataset == "math" else "number"),
      progress=not args.no_progress)


if __name__ == "__main__":
  main()
