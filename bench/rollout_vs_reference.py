"""Ours against the official PyTorch CoLaR figures of issue #19 (same config, this CPU).

    python bench/rollout_vs_reference.py                      # SFT B=32, rollout B=1 and B=32
    python bench/rollout_vs_reference.py --reps 3 --parts rollout32 --profile /tmp/prof

The config of the issue: random Llama, vocab 49153 (SmolLM2's 49152 + pad), d=256,
ff=672, 4 layers, 4/2 heads, head_dim 64, tied embeddings, full fine-tuning, latent
head 256, c=2, fp32, the first 32 GSM8k train items (``../shared/data/gsm8k/train.jsonl``;
synthetic questions of similar length when it is absent). Times OUR CoLaR SFT step
(B=32) and OUR rollout (64 latents + 16 answer tokens, forced: the separator and EOS are
unreachable) at B=1 and B=32, the median of ``--reps`` calls after ``--warmup``.

The reference column is NOT measured here (that needs torch and the reference code, which
the project does not ship): it holds the figures the issue measured for the reference on
this 2-core CPU (fp32, 2 threads, same weights and batch). The ratio printed is
reference time / our time, i.e. how many times faster we are.

Token ids: the SmolLM2 tokenizer when it is at hand (``--tokenizer``: an HF tokenizer
dir or a ``.gguf``; by default the GGUF the SmolLM2 parity test caches in
``.cache/smollm2``), else a stand-in with SmolLM2-like splitting (single digits, words
with their leading space, punctuation runs). Only the lengths matter for timing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from colar_jax import config, methods  # noqa: E402
from colar_jax.data import parsers, prompts  # noqa: E402
from colar_jax.data.records import Record  # noqa: E402
from colar_jax.decode.rollout import RolloutConfig, rollout  # noqa: E402
from colar_jax.model import CoLaRModel  # noqa: E402
from colar_jax.model import sharding as shd  # noqa: E402
from colar_jax.train import state as ts  # noqa: E402
from colar_jax.train.run import model_config  # noqa: E402

# Issue #19's reference figures (seconds; the first of its two runs), NOT from this run.
REFERENCE_S = {"sft32": 7.5, "rollout1": 1.07, "rollout32": 7.7}
LABELS = {
  "sft32": "CoLaR SFT step, B={items}",
  "rollout1": "rollout 64 latents + 16 answer tokens, B=1",
  "rollout32": "rollout 64 latents + 16 answer tokens, B={items}",
}
VOCAB, EOS, SEP, PAD = 49153, 0, 1, 49152  # SmolLM2: <|endoftext|> = 0; pad appended
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
_PIECES = re.compile(r"###|\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+")


class StandInTokenizer:
  """What ``data.prompts`` reads of a tokenizer; ids = a hash of SmolLM2-like pieces."""

  eos_token_id, pad_token_id = EOS, PAD

  def __call__(self, texts, add_special_tokens=False):
    del add_special_tokens
    return {"input_ids": [[self._id(p) for p in _PIECES.findall(t)] for t in texts]}

  @staticmethod
  def _id(piece: str) -> int:
    return SEP if piece == "###" else 2 + zlib.crc32(piece.encode()) % (VOCAB - 3)


def load_tokenizer(arg: str):
  """(tokenizer, description) for ``--tokenizer``: auto, stand-in, a dir or a .gguf."""
  if arg == "auto":
    found = sorted((ROOT / ".cache" / "smollm2").glob("*.gguf"))
    arg = str(found[0]) if found else "stand-in"
  if arg == "stand-in":
    return StandInTokenizer(), "stand-in (SmolLM2-like splitting)"
  if arg.endswith(".gguf"):
    from transformers import AutoTokenizer

    path = Path(arg)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), arg
  return prompts.load_tokenizer(arg), arg


def records(n: int) -> tuple[list[Record], str]:
  if GSM8K.is_file():
    it = parsers.read_gsm8k_jsonl(GSM8K)
    return [next(it) for _ in range(n)], f"the first {n} items of {GSM8K}"
  rng = np.random.default_rng(0)
  words = "she has apples and buys more each day how many does he sell in total".split()
  out = []
  for i in range(n):  # ~45-word questions, 3 equations: GSM8k's typical lengths
    q = " ".join(rng.choice(words, 45)) + f" {i}?"
    steps = [f"<<{a}*{b}={a * b}>>" for a, b in rng.integers(2, 99, (3, 2))]
    out.append(Record(question=q, steps=steps, answer=str(i)))
  return out, f"{n} synthetic questions ({GSM8K} not found)"


def exact_buckets(texts: dict[str, list[str]], tok) -> prompts.Buckets:
  """One bucket per part = its longest row (the reference pads to the longest)."""
  longest = {k: max(len(t) for t in prompts.encode_texts(tok, v)) for k, v in texts.items()}
  return prompts.Buckets(
    question=(longest.get("question", 1),),
    steps=(longest.get("steps", 1),),
    answer=(longest.get("answer", 1) + 1,),  # + EOS
  )


def build_run(dtype: str):
  c = config.base_config()
  c.method = "colar"
  arch = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=672,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    tie_embeddings=True,
  )
  for k, v in arch.items():
    setattr(c.model.arch, k, v)
  c.model.dtype, c.model.param_dtype = dtype, "float32"
  c.model.latent_hidden_size = 256
  return config.from_config_dict(c)


def median_time(fn, reps: int, warmup: int) -> tuple[float, list[float], float]:
  """(median seconds, all timings, seconds of the first call incl. compilation)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(-1))
  first = time.perf_counter() - t
  for i in range(warmup - 1):
    jax.block_until_ready(fn(-2 - i))
  times = []
  for i in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t)
  return statistics.median(times), times, first


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--reps", type=int, default=5, help="timed calls per measure (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1: compiles)")
  p.add_argument("--parts", default="sft32,rollout1,rollout32", help="comma list of measures")
  p.add_argument("--dtype", default="float32", help="compute dtype (the issue's: float32)")
  p.add_argument("--items", type=int, default=32, help="batch size of the B=32 measures")
  p.add_argument("--top-k", type=int, default=None, help="rollout top_k (default: the schema's)")
  p.add_argument("--top-p", type=float, default=None, help="rollout top_p (default: schema's)")
  p.add_argument("--profile", default="", help="dir: trace one call of each rollout measure")
  p.add_argument("--tokenizer", default="auto", help="auto | stand-in | HF dir | .gguf file")
  a = p.parse_args()
  parts = a.parts.split(",")
  unknown = set(parts) - set(REFERENCE_S)
  if unknown:
    raise SystemExit(f"unknown --parts {sorted(unknown)}; known: {', '.join(REFERENCE_S)}")

  run = build_run(a.dtype)
  mc = model_config(run)
  tok, tok_name = load_tokenizer(a.tokenizer)
  templates = prompts.PromptTemplates.of(run.data)
  recs, source = records(a.items)
  print(
    f"device {common.device_name()}  jax {jax.__version__}  dtype {a.dtype}  data: {source}\n"
    f"tokenizer: {tok_name}; load average at start {os.getloadavg()[0]:.2f} "
    "(other processes on these cores slow every figure)\n"
    f"model: vocab {mc.vocab_size} d {mc.hidden_size} ff {mc.intermediate_size} "
    f"layers {mc.num_layers} heads {mc.num_heads}/{mc.num_kv_heads} head_dim {mc.head_dim} "
    f"tied {mc.tie_embeddings} latent head {mc.latent_hidden_size}; c=2; median of {a.reps} "
    f"after {a.warmup} warm-up"
  )
  results = {}

  if "sft32" in parts:
    mesh = shd.make_mesh()
    rules = shd.logical_rules(run.sharding)
    model = shd.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)), mesh, rules)
    graphdef, params, frozen = ts.split_model(model, False)
    tx = ts.make_optimizer(run.optim, 1000)
    shard = ts.state_shardings(tx, params, ts.param_shardings(nnx.State(params), mesh, rules), mesh)
    state = ts.init_train_state(params, tx, 0, shard)
    del model, params
    embed_std = 0.02
    step, _ = ts.compile_steps(
      graphdef, tx, methods.get("colar").loss_settings(run, embed_std), shard
    )
    buckets = exact_buckets(
      dict(
        question=[templates.question_text(r.question, 2) for r in recs],
        steps=[templates.steps_text(r.steps) for r in recs],
        answer=[templates.answer_text(r.answer) for r in recs],
      ),
      tok,
    )
    batch = prompts.encode_sft_batch(recs, tok, templates, 2, buckets)
    shapes = {k: v.shape[1] for k, v in batch.items() if k.endswith("_ids")}
    batch = ts.put_batch(
      {k: v for k, v in batch.items() if k.endswith(("_ids", "_mask"))}, mesh, rules
    )
    holder = [state]

    def sft(_i):
      holder[0], m = step(holder[0], frozen, batch, method="colar", c=2)
      return m["loss"]

    results["sft32"] = median_time(sft, a.reps, a.warmup)
    print(f"SFT batch: {len(recs)} rows, padded lengths {shapes}")
    del holder, state

  model = CoLaRModel(mc, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  overrides = {}
  if a.top_k is not None:
    overrides["top_k"] = a.top_k
  if a.top_p is not None:
    overrides["top_p"] = a.top_p
  # Forced lengths: no sampled token is ever -1 / the separator check never fires, so
  # every row runs 64 latents, the separator, then 16 answer tokens (EOS -1: never).
  cfg = RolloutConfig(
    separator_id=-1,
    eos_id=-1,
    pad_id=PAD,
    max_latent_steps=64,
    max_new_tokens=16,
    embed_std=0.02,
    **overrides,
  )
  for name, b in (("rollout1", 1), ("rollout32", a.items)):
    if name not in parts:
      continue
    qs = [r.question for r in recs[:b]]
    texts = [templates.question_text(q, 2) + templates.separator for q in qs]
    buckets = exact_buckets(dict(question=texts), tok)
    enc = prompts.encode_prompt_batch(qs, tok, templates, 2, buckets)
    ids, mask = enc["question_ids"], enc["question_mask"].astype(bool)
    key = jax.random.key(0)

    def call(i, ids=ids, mask=mask, key=key):
      k = jax.random.fold_in(key, i + 10)
      return rollout(graphdef, state, ids, mask, k, cfg, batch_buckets=None)

    out = jax.device_get(call(0))
    results[name] = median_time(call, a.reps, a.warmup)
    print(
      f"{name}: prompt [{ids.shape[0]}, {ids.shape[1]}]; latents per row "
      f"{sorted(set(out.num_latents.tolist()))}, answer tokens per row "
      f"{sorted(set(out.answer_mask.sum(-1).tolist()))}; top_k {cfg.top_k} top_p {cfg.top_p}"
    )
    if a.profile:  # one more call under the profiler, outside the timings
      with jax.profiler.trace(f"{a.profile}/{name}", create_perfetto_trace=True):
        jax.block_until_ready(call(99))
      print(f"  trace: python bench/trace_summary.py {a.profile}/{name}")

  print(
    "\nreference = issue #19's measurement of the official PyTorch code on this CPU "
    f"(not run here); load average at the end {os.getloadavg()[0]:.2f}"
  )
  print(
    f"{'measure':46s} {'ours (median)':>14s} {'first call':>11s} {'reference':>10s} {'faster by':>10s}"
  )
  for name in REFERENCE_S:
    if name not in results:
      continue
    med, times, first = results[name]
    # The reference was measured at B=32 only: other --items have no reference column.
    ref = REFERENCE_S[name] if a.items == 32 or name == "rollout1" else None
    vs = f"{ref:8.2f} s {ref / med:9.2f}x" if ref else f"{'n/a':>10s} {'n/a':>10s}"
    print(
      f"{LABELS[name].format(items=a.items):46s} {med:12.3f} s {first:9.1f} s {vs}"
      f"   (all: {', '.join(f'{t:.3f}' for t in times)})"
    )


if __name__ == "__main__":
  main()
