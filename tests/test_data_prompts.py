"""Templates, tokenizers and the numpy SFT / prompt encoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from colar_jax import config, methods
from colar_jax.data import parsers
from colar_jax.data.prompts import (
  Buckets,
  EncodeStats,
  PromptTemplates,
  Speed,
  char_tokenizer_corpus,
  check_ends_with_separator,
  encode_prompt_batch,
  encode_sft_batch,
  encode_with_separator,
  load_tokenizer,
  separator_id,
  train_char_tokenizer,
)
from colar_jax.data.records import Record
from colar_jax.data.synthetic import make_record
from colar_jax.methods.base import EncodeContext

T = PromptTemplates()
REPO = Path(__file__).resolve().parents[1]
RECS = [
  make_record(2, [("*", 3), ("-", 2), ("-", 8), ("-", 7)], 10),
  make_record(5, [("+", 1), ("*", 4)], 10),
  Record("x=1;x+1?", (), "2"),  # an empty chain still gets the opening separator
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_char_tokenizer(char_tokenizer_corpus(RECS), tmp_path_factory.mktemp("tok"))


def visible(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]


def test_templates_and_buckets_of_the_data_section():
  t = PromptTemplates.of(
    dataclasses.replace(config.Data(), thinking_separator="@@", step_joiner=" ")
  )
  assert t.question == "Question: {} Let's think step by step:" and t.separator == "@@"
  assert (
    t.question_text("Q", "auto") == "Question: Q Let's think step by step:(Thinking speed: auto)"
  )
  assert t.steps_text(["a", "b"]) == "@@a b" and t.answer_text("7") == "@@Answer:7"
  assert t.answer_prefix == "Answer:"
  assert (
    PromptTemplates.of(config.Data()) == PromptTemplates()
  )  # the schema's defaults are the reference's
  b = Buckets.of(
    dataclasses.replace(config.Data(), question_buckets=(64, 16, 32), answer_buckets=(8,))
  )
  assert b.question == (16, 32, 64) and b.answer == (8,) and b.steps == config.Data().steps_buckets
  with pytest.raises(ValueError):
    PromptTemplates(question="no slot")
  with pytest.raises(
    config.ConfigError,
    match=r"^config\.data\.separator: no such key; did you mean data\.thinking_separator",
  ):
    config.from_config_dict({"data": {"separator": "x"}})


def test_char_tokenizer_roundtrip_and_single_token_separator(tok, tmp_path):
  sep = separator_id(tok, T)
  text = T.question_text(RECS[0].question, 3) + T.steps_text(RECS[0].steps) + T.answer_text("9")
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == text
  assert ids.count(sep) == 2  # '###' is one id, not three '#'
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  saved = Path(tok.name_or_path)
  assert json.loads((saved / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"
  assert load_tokenizer(saved)(text, add_special_tokens=False)["input_ids"] == ids


def test_load_tokenizer_adds_a_pad_token(tmp_path, tok):
  src = Path(tok.name_or_path)
  nopad = tmp_path / "nopad"
  nopad.mkdir()
  tj = json.loads((src / "tokenizer.json").read_text())
  tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<pad>"]
  tj["model"]["vocab"].pop("<pad>")
  (nopad / "tokenizer.json").write_text(json.dumps(tj))
  cfg = json.loads((src / "tokenizer_config.json").read_text())
  cfg.pop("pad_token")
  (nopad / "tokenizer_config.json").write_text(json.dumps(cfg))
  n = len(load_tokenizer(nopad, pad_as_eos=True))
  added = load_tokenizer(nopad)
  assert added.pad_token == "[PAD]" and len(added) == n + 1 and added.pad_token_id == n
  as_eos = load_tokenizer(nopad, pad_as_eos=True)
  assert as_eos.pad_token_id == as_eos.eos_token_id


def test_encode_sft_batch_layout(tok):
  b = Buckets(question=(32, 80, 128), steps=(8, 16, 32), answer=(8, 16))
  batch = encode_sft_batch(RECS, tok, T, Speed(3), b)  # longest question: 75 chars
  assert {k: v.shape for k, v in batch.items()} == {
    "question_ids": (3, 80),
    "question_mask": (3, 80),
    "steps_ids": (3, 32),
    "steps_mask": (3, 32),
    "answer_ids": (3, 16),
    "answer_mask": (3, 16),
    "speed": (3,),
    "compression_factor": (3,),
  }
  assert all(v.dtype == np.int32 for v in batch.values())
  # Left padding: every question/steps row ends in the last column; answers start at column 0.
  assert (
    batch["question_mask"][:, -1].all()
    and batch["steps_mask"][:, -1].all()
    and batch["answer_mask"][:, 0].all()
  )
  for part in ("question", "steps"):
    m = batch[f"{part}_mask"]
    assert (np.diff(m, axis=1) >= 0).all()  # 0...0 1...1
  assert (np.diff(batch["answer_mask"], axis=1) <= 0).all()  # 1...1 0...0
  pad = tok.pad_token_id
  assert (batch["question_ids"][batch["question_mask"] == 0] == pad).all()
  q = [tok.decode(r) for r in visible(batch["question_ids"], batch["question_mask"])]
  s = [tok.decode(r) for r in visible(batch["steps_ids"], batch["steps_mask"])]
  a = visible(batch["answer_ids"], batch["answer_mask"])
  assert q[0] == "Question: x=2;x*3;x-2;x-8;x-7? Let's think step by step:(Thinking speed: 3)"
  assert s == ["###2*3=6\n6-2=4\n4-8=6\n6-7=9", "###5+1=6\n6*4=4", "###"]
  assert [row[-1] for row in a] == [tok.eos_token_id] * 3
  assert [tok.decode(row[:-1]) for row in a] == ["###Answer:9", "###Answer:4", "###Answer:2"]
  assert batch["speed"].tolist() == [3, 3, 3] and batch["compression_factor"].tolist() == [3, 3, 3]


def test_auto_speed_keeps_the_compression_factor(tok):
  batch = encode_sft_batch(RECS[:1], tok, T, Speed(4, auto=True), Buckets())
  text = tok.decode(visible(batch["question_ids"], batch["question_mask"])[0])
  assert text.endswith("(Thinking speed: auto)")
  assert batch["speed"].tolist() == [0] and batch["compression_factor"].tolist() == [4]


def test_truncation_keeps_the_speed_suffix_and_is_counted(tok):
  b = Buckets(question=(16,), steps=(8,), answer=(4,))
  stats = EncodeStats()
  batch = encode_sft_batch(RECS, tok, T, 2, b, stats=stats)
  full = T.question_text(RECS[0].question, 2)
  assert tok.decode(batch["question_ids"][0].tolist()) == full[-16:] == "inking speed: 2)"
  assert tok.decode(batch["steps_ids"][0].tolist()).startswith("###2*3=6")
  assert stats.truncated == {"question": 3, "steps": 2, "answer": 3} and stats.rows == 3


def test_fixed_shapes_use_the_largest_bucket(tok):
  b = Buckets(question=(32, 64, 128), steps=(8, 16, 32), answer=(8, 16))
  batch = encode_sft_batch(RECS[2:], tok, T, 1, b, fixed_shapes=True)
  assert (
    batch["question_ids"].shape[1],
    batch["steps_ids"].shape[1],
    batch["answer_ids"].shape[1],
  ) == (128, 32, 16)


def test_encode_prompt_batch(tok):
  b = Buckets(question=(64, 128))
  out = encode_prompt_batch([r.question for r in RECS], tok, T, 5, b)
  assert out["question_ids"].shape == (3, 128)
  assert (out["question_ids"][:, -1] == separator_id(tok, T)).all()
  first = tok.decode(visible(out["question_ids"], out["question_mask"])[0])
  assert first == "Question: x=2;x*3;x-2;x-8;x-7? Let's think step by step:(Thinking speed: 5)###"
  bare = encode_prompt_batch(["x=1;x+1?"], tok, T, None, b, append_separator=False)
  assert (
    tok.decode(visible(bare["question_ids"], bare["question_mask"])[0])
    == "Question: x=1;x+1? Let's think step by step:"
  )
  assert bare["question_ids"].shape == (1, 64)


def test_separator_must_be_one_token(tok):
  with pytest.raises(ValueError, match="single token"):
    separator_id(tok, PromptTemplates(separator="#=#"))


def test_templates_from_run_config_carry_the_step_joiner(tmp_path):
  c = config.base_config()
  c.data.step_joiner = ""
  t = PromptTemplates.of(config.from_config_dict(c).data)
  assert t.steps_text(["2*3=6", "6+2=8"]) == "###2*3=66+2=8"
  assert (t.question, t.answer) == (c.data.question_template, c.data.answer_template)
  c.data.steps_template = "{};"  # a trailing terminator after the last step too
  assert PromptTemplates.of(config.from_config_dict(c).data).steps_text(["a", "b"]) == "###ab;"
  old = config.to_dict(
    config.from_config_dict(c)
  )  # a config saved before step_joiner / steps_template
  del old["data"]["step_joiner"], old["data"]["steps_template"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(old))
  assert PromptTemplates.of(config.load_json(str(path)).data).steps_text(["a", "b"]) == "###a\nb"


# ----------------------------------------------------------------------------- separator ids
SPEEDS = (1, 2, 3, 4, 5, "auto")
GSM_LIKE = [
  Record(
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    ("<<48/2=24>>", "<<48+24=72>>"),
    "72",
  ),
  Record(
    "Weng earns $12 an hour for babysitting. How much did she earn for 50 minutes?",
    (
      "<<12/60=0.2>>",
      "<<0.2*50=10>>",
    ),
    "10",
  ),
  Record("What is 3 (the number)?", (), "3"),  # a question ending in ')' itself
]


def whole(tok, text: str) -> list[int]:
  """The ids of ``text`` tokenized as ONE string (what the encoders used to do)."""
  return tok(text, add_special_tokens=False)["input_ids"]


def bpe_merging_paren_separator(out_dir: Path):
  """A byte-level BPE whose merges make ``###`` one token and ``)###`` another: a
  tokenizer on which ``...(Thinking speed: 2)###`` as one string does not end in ``###``."""
  vocab = {"<pad>": 0, "<eos>": 1}
  for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
    vocab.setdefault(ch, len(vocab))
  merges = [("#", "#"), ("##", "#"), (")", "###")]
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.add_special_tokens(["<pad>", "<eos>"])
  out_dir.mkdir(parents=True, exist_ok=True)
  bpe.save(str(out_dir / "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<eos>"}
  (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
  return load_tokenizer(out_dir)


def _check_prompts_are_training_ids(tk, templates: PromptTemplates, records) -> None:
  """At every speed the inference prompt is training's question part followed by the first
  id of its steps part (the separator); the staged encoders' prompts (Coconut: ``auto``
  and the separator) equal the inference prompt too."""
  sep = separator_id(tk, templates)
  qs = [r.question for r in records]
  for speed in SPEEDS:
    train = encode_sft_batch(records, tk, templates, speed, Buckets())
    q_rows = visible(train["question_ids"], train["question_mask"])
    s_rows = visible(train["steps_ids"], train["steps_mask"])
    assert [r[0] for r in s_rows] == [sep] * len(records)
    infer = encode_prompt_batch(qs, tk, templates, speed, Buckets())
    assert visible(infer["question_ids"], infer["question_mask"]) == [q + [sep] for q in q_rows]
  ctx = EncodeContext(tk, templates, Buckets())
  staged = methods.get("coconut").encode(config.Run(), records, ctx, speed=Speed(1), stage=1)
  infer = encode_prompt_batch(qs, tk, templates, "auto", Buckets())
  assert visible(staged["question_ids"], staged["question_mask"]) == visible(
    infer["question_ids"], infer["question_mask"]
  )


def test_a_bpe_merge_across_the_separator_no_longer_changes_the_prompt(tmp_path):
  bpe = bpe_merging_paren_separator(tmp_path / "bpe")
  sep = separator_id(bpe, T)
  # The bug: as one string, the prompt's last token is ')###', not the separator.
  one_string = whole(bpe, T.question_text(GSM_LIKE[0].question, 2) + T.separator)
  assert one_string[-1] != sep and bpe.decode(one_string[-1:]) == ")###"
  _check_prompts_are_training_ids(bpe, T, GSM_LIKE)
  rows = visible(*encode_prompt_batch(["q?"], bpe, T, 2, Buckets()).values())
  assert rows[0][-2:] == whole(bpe, ")") + [sep]


def test_prompt_rows_must_end_with_the_separator(tok):
  sep = separator_id(tok, T)
  check_ends_with_separator([[5, sep], [sep]], sep, tok)
  with pytest.raises(ValueError, match=r"prompt row 1 ends with .* not the thinking separator"):
    check_ends_with_separator([[5, sep], [sep, 5]], sep, tok)
  with pytest.raises(ValueError, match="prompt row 0"):
    check_ends_with_separator([[]], sep, tok)


def test_char_tokenizer_ids_are_those_of_the_whole_strings(tok, tmp_path):
  """The demo's tokenizer (the separator an added token) gets exactly the ids it got when
  every part was tokenized as one string: ``make demo`` sees the same batches."""
  demo = PromptTemplates.of(
    config.from_config_dict(config.load(f"{REPO / 'configs' / 'demo.py'}:cot")).data
  )
  demo_tok = train_char_tokenizer(char_tokenizer_corpus(RECS), tmp_path / "t", templates=demo)
  for tk, t in ((tok, T), (demo_tok, demo)):
    batch = encode_sft_batch(RECS, tk, t, 3, Buckets())
    want_q = [whole(tk, t.question_text(r.question, 3)) for r in RECS]
    want_s = [whole(tk, t.steps_text(r.steps)) for r in RECS]
    want_a = [whole(tk, t.answer_text(r.answer)) + [tk.eos_token_id] for r in RECS]
    assert visible(batch["question_ids"], batch["question_mask"]) == want_q
    assert visible(batch["steps_ids"], batch["steps_mask"]) == want_s
    assert visible(batch["answer_ids"], batch["answer_mask"]) == want_a
    prompt = encode_prompt_batch([r.question for r in RECS], tk, t, 2, Buckets())
    want_p = [whole(tk, t.question_text(r.question, 2) + t.separator) for r in RECS]
    assert visible(prompt["question_ids"], prompt["question_mask"]) == want_p


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf, tmp_path_factory):
  """SmolLM2-135M-Instruct's tokenizer, built from its GGUF as ``convert`` does (~7 s)."""
  from transformers import AutoTokenizer

  tk = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
  out = tmp_path_factory.mktemp("smol_tok")
  tk.save_pretrained(out)
  return load_tokenizer(out, pad_as_eos=True)  # as a run on converted weights loads it


def test_smollm2_prompts_are_training_ids(smol_tok):
  _check_prompts_are_training_ids(smol_tok, T, GSM_LIKE)
  # Training's parts keep the ids of their whole strings on this tokenizer.
  batch = encode_sft_batch(GSM_LIKE, smol_tok, T, 2, Buckets())
  assert visible(batch["steps_ids"], batch["steps_mask"]) == [
    whole(smol_tok, T.steps_text(r.steps)) for r in GSM_LIKE
  ]
  assert visible(batch["answer_ids"], batch["answer_mask"]) == [
    whole(smol_tok, T.answer_text(r.answer)) + [smol_tok.eos_token_id] for r in GSM_LIKE
  ]


@pytest.mark.slow
def test_smollm2_ids_unchanged_on_all_of_gsm8k(smol_tok, shared_data):
  """Every GSM8k text the encoders tokenize (both step configs, train + test, inference
  prompts at six speeds): the separated encoding equals the one-string encoding on
  SmolLM2, and every one-string prompt already ended in the separator (~40 s)."""
  sep = separator_id(smol_tok, T)
  n_texts = n_diff = n_bad_end = 0
  for mode in ("equations", "natural"):
    texts = []
    for split in ("train.jsonl", "test.jsonl"):
      for r in parsers.read_gsm8k_jsonl(shared_data / "gsm8k" / split, steps_mode=mode):
        texts += [T.question_text(r.question, sp) + T.separator for sp in SPEEDS]
        texts += [T.steps_text(r.steps), T.answer_text(r.answer)]
    old = [whole(smol_tok, t) for t in texts]
    new, _ = encode_with_separator(smol_tok, texts, T.separator)
    n_texts += len(texts)
    n_diff += sum(o != n for o, n in zip(old, new))
    n_bad_end += sum(o[-1] != sep for o, t in zip(old, texts) if t.endswith(T.separator))
  print(
    f"\nSmolLM2 GSM8k: {n_diff} of {n_texts} texts differ; {n_bad_end} prompts not ending in ###"
  )
  assert n_diff == 0 and n_bad_end == 0
  # What a CoT answer holds after its prompt (chain + ###Answer:a + EOS): the decoding
  # budget a CoT evaluation needs (rollout.max_new_tokens).
  test = list(parsers.read_gsm8k_jsonl(shared_data / "gsm8k" / "test.jsonl"))
  cot = [
    len(whole(smol_tok, T.steps.format(T.step_joiner.join(r.steps)) + T.answer_text(r.answer))) + 1
    for r in test
  ]
  p50, p90, top = np.percentile(cot, [50, 90, 100])
  print(
    f"CoT outputs on GSM8k test: p50 {p50:.0f}, p90 {p90:.0f}, max {top:.0f} tokens; "
    f"{np.mean(np.asarray(cot) > 32):.0%} longer than 32"
  )
