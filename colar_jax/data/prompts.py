"""Prompt templates, tokenizers and numpy batch encoders shared by EVERY training method.

Layout of one SFT example (as the reference CoLaR; ``|`` separates the three parts)::

    [pad.. Question: {q} Let's think step by step:(Thinking speed: {c})]   question, LEFT padded
    [pad.. ###{step1}\\n{step2}...]                                          steps, LEFT padded
    [###Answer:{a}<eos> ..pad]                                              answer, RIGHT padded

Left-padding the first two parts makes every row's question+steps end at the same column,
so the answer always starts at the same position and latent steps can be appended after
the question without per-row gathers. The speed ``c`` is the compression factor or the
string ``auto``; in a batch dict ``speed`` holds it as an int (0 = auto) and
``compression_factor`` the factor the model must actually compress with (the reference
draws a factor, then with probability ``auto_prob`` *shows* ``auto`` in the prompt while
still compressing with that factor). At inference the prompt is question + speed +
``###`` (:func:`encode_prompt_batch`). The separator is always its own id, with the text
around it tokenized apart (:func:`encode_with_separator`), so the two agree whatever a
BPE would merge across it.

API (numpy only, no jax):
  * :class:`PromptTemplates`, :class:`Buckets` - ``of(config.Data section)``.
  * :class:`Speed` - a drawn speed (factor, auto flag).
  * ``encode_sft_batch(records, tokenizer, templates, speed, buckets)`` -> dict of int32
    ``question_ids/_mask``, ``steps_ids/_mask``, ``answer_ids/_mask`` ([B, L] each),
    ``speed`` and ``compression_factor`` ([B]).
  * ``encode_prompt_batch(questions, tokenizer, templates, speed, buckets)`` -> left-padded
    ``question_ids/_mask`` for generation / RL rollouts.
  * ``load_tokenizer(path)``, ``train_char_tokenizer(texts, out_dir)``, ``separator_id``.

Each part is padded to the smallest bucket length >= its longest row (so a run sees at most
``len(buckets)`` shapes per part); rows longer than the largest bucket are truncated
(question: its start is dropped so the speed suffix survives; steps/answer: their end) and
counted in an optional :class:`EncodeStats`. Masks are the ground truth for padding: the
pad id may equal another id (``load_tokenizer(pad_as_eos=True)``), so never mask by id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from colar_jax import config as cfglib
from colar_jax import paths
from colar_jax.data.records import Record

log = logging.getLogger(__name__)
_TOKENIZER_LOCK = threading.Lock()  # HF fast tokenizers mutate padding state per call


_DATA = cfglib.Data()  # the schema is the one source of the defaults below


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
  """The prompt templates (defaults: the reference's); each ``{}`` is filled positionally."""

  question: str = _DATA.question_template
  speed: str = _DATA.speed_template
  separator: str = _DATA.thinking_separator
  steps: str = _DATA.steps_template
  step_joiner: str = _DATA.step_joiner
  answer: str = _DATA.answer_template

  def __post_init__(self) -> None:
    for name in ("question", "speed", "steps", "answer"):
      if getattr(self, name).count("{}") != 1:
        raise ValueError(f"template {name!r} must contain exactly one '{{}}'")
    if not self.separator:
      raise ValueError("the thinking separator must not be empty")

  @classmethod
  def of(cls, data: Any) -> PromptTemplates:
    """From a ``config.Data`` section (``*_template``, ``thinking_separator``, ``step_joiner``)."""
    return cls(
      question=data.question_template,
      speed=data.speed_template,
      separator=data.thinking_separator,
      answer=data.answer_template,
      steps=data.steps_template,
      step_joiner=data.step_joiner,
    )

  @property
  def answer_prefix(self) -> str:
    """What precedes the answer in generated text (``"Answer:"``), for extraction."""
    return self.answer.split("{}")[0]

  def question_text(self, question: str, speed: int | str | None) -> str:
    text = self.question.format(question)
    return text if speed is None else text + self.speed.format(speed)

  def steps_text(self, steps: Sequence[str]) -> str:
    return self.separator + self.steps.format(self.step_joiner.join(steps))

  def answer_text(self, answer: str) -> str:
    """Separator + answer (EOS is appended as an id by the encoder)."""
    return self.separator + self.answer.format(answer)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded lengths per part (sorted ascending); the largest is the hard cap."""

  question: tuple[int, ...] = _DATA.question_buckets
  steps: tuple[int, ...] = _DATA.steps_buckets
  answer: tuple[int, ...] = _DATA.answer_buckets

  def __post_init__(self) -> None:
    for name in ("question", "steps", "answer"):
      value = tuple(int(v) for v in getattr(self, name))
      if not value or any(v <= 0 for v in value):
        raise ValueError(f"buckets.{name} must be a non-empty tuple of positive lengths")
      object.__setattr__(self, name, tuple(sorted(set(value))))

  @classmethod
  def of(cls, data: Any) -> Buckets:
    """From a ``config.Data`` section's ``*_buckets``."""
    return cls(
      question=tuple(data.question_buckets),
      steps=tuple(data.steps_buckets),
      answer=tuple(data.answer_buckets),
    )


def check_factor_weights(factors: Sequence[int], weights: Sequence[float]) -> tuple[float, ...]:
  """``weights`` as floats: empty (uniform), or one weight >= 0 per factor, not all 0."""
  w = tuple(float(x) for x in weights)
  if w and (len(w) != len(factors) or min(w) < 0 or sum(w) <= 0):
    raise ValueError(f"weights {w} must be >= 0, not all 0, one per factor {tuple(factors)}")
  return w


@dataclasses.dataclass(frozen=True)
class Speed:
  """A thinking speed: the compression ``factor`` and whether the prompt shows ``auto``."""

  factor: int = 1
  auto: bool = False

  @property
  def prompt_value(self) -> int | str:
    return "auto" if self.auto else self.factor

  @property
  def code(self) -> int:
    """Integer form for arrays: 0 = auto, else the factor."""
    return 0 if self.auto else self.factor

  @classmethod
  def of(cls, value: Speed | int | str) -> Speed:
    if isinstance(value, Speed):
      return value
    if value == "auto":
      return cls(factor=1, auto=True)
    return cls(factor=int(value))


@dataclasses.dataclass
class EncodeStats:
  """Running counts of truncated rows per part (a warning is logged on each truncation)."""

  rows: int = 0
  truncated: dict[str, int] = dataclasses.field(
    default_factory=lambda: {"question": 0, "steps": 0, "answer": 0}
  )


# ----------------------------------------------------------------------------- tokenizers
def load_tokenizer(path: str | Path, *, pad_as_eos: bool = False, pad_token: str = "[PAD]") -> Any:
  """An HF tokenizer from a local folder (tokenizer.json + tokenizer_config.json).

  A missing pad token is added as a new special token ``[PAD]`` like the reference (the
  vocabulary grows by one: size embeddings with ``len(tokenizer)``), or, with
  ``pad_as_eos=True``, set to EOS (no new row; masks still tell padding apart).
  """
  from transformers import AutoTokenizer  # noqa: PLC0415 (seconds to import: only when loading)

  tok = AutoTokenizer.from_pretrained(paths.local_copy(path), local_files_only=True)
  if tok.eos_token is None:
    raise ValueError(f"{path}: tokenizer has no EOS token; the answer part needs one")
  if tok.pad_token is None:
    if pad_as_eos:
      tok.pad_token = tok.eos_token
    else:
      tok.add_special_tokens({"pad_token": pad_token})
  return tok


_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def train_char_tokenizer(
  texts: Iterable[str], out_dir: str | Path, *, templates: PromptTemplates | None = None
) -> Any:
  """Build a character-level tokenizer with the ``tokenizers`` library, save it, load it.

  Vocabulary: ``<pad>=0 <bos>=1 <eos>=2 <unk>=3``, the thinking separator as ONE token
  (CoLaR stops latent thinking when it predicts the separator, so it must be a single
  id), then every character of ``texts``, of the templates, the digits and ``auto``.
  Saved as a HF-loadable folder (tokenizer.json + tokenizer_config.json) so a run can
  keep it in its workdir and reload it with :func:`load_tokenizer`.
  """
  if paths.is_url(out_dir):  # the tokenizers library writes local files only
    with tempfile.TemporaryDirectory() as tmp:
      train_char_tokenizer(texts, tmp, templates=templates)
      paths.copy_dir(tmp, out_dir)
    return load_tokenizer(out_dir)
  templates = templates or PromptTemplates()
  chars: set[str] = set("0123456789auto")
  for text in texts:
    chars.update(text)
  for part in (
    templates.question,
    templates.speed,
    templates.steps,
    templates.step_joiner,
    templates.answer,
  ):
    chars.update(part.replace("{}", ""))
  vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
  for c in sorted(chars):
    vocab.setdefault(c, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(_SPECIALS))
  tok.add_tokens([templates.separator])
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "model_max_length": 1 << 20,
    "clean_up_tokenization_spaces": False,
  }
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return load_tokenizer(out)


def char_tokenizer_corpus(records: Iterable[Record]) -> Iterator[str]:
  """Every text of ``records`` that the encoders will tokenize (for the char vocabulary)."""
  for rec in records:
    yield rec.question
    yield from rec.steps
    yield rec.answer


def separator_id(tokenizer: Any, templates: PromptTemplates) -> int:
  """The id of the thinking separator; raises if it is not exactly one token."""
  return _single_token(tokenizer, templates.separator)


def _single_token(tokenizer: Any, separator: str) -> int:
  ids = encode_texts(tokenizer, [separator])[0]
  if len(ids) != 1:
    raise ValueError(
      f"thinking separator {separator!r} is {len(ids)} tokens for this tokenizer; "
      "CoLaR needs it as a single token (add it with tokenizer.add_tokens)"
    )
  return ids[0]


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, no special tokens added (thread-safe)."""
  with _TOKENIZER_LOCK:
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def encode_with_separator(
  tokenizer: Any, texts: Sequence[str], separator: str
) -> tuple[list[list[int]], int]:
  """Token ids of each text with every ``separator`` as its own single id; returns
  (ids per text, the separator's id).

  The text between separators is tokenized on its own, as a tokenizer does around an
  added token. So a part that ends with the separator (an inference prompt
  ``...(Thinking speed: 2)###``) gives the same ids as its text and the separator
  tokenized apart (training's question part, then a steps part opening with ``###``):
  a BPE that merges ``)###`` into one token cannot make the last prompt token something
  other than the separator the model was trained to read. For the char tokenizer, where
  the separator is an added token already, the ids are those of the whole string.
  """
  sep_id = _single_token(tokenizer, separator)
  split = [t.split(separator) for t in texts]
  pieces = [p for parts in split for p in parts if p]
  piece_ids = iter(encode_texts(tokenizer, pieces) if pieces else [])
  out = []
  for parts in split:
    row: list[int] = []
    for j, part in enumerate(parts):
      if j:
        row.append(sep_id)
      if part:
        row.extend(next(piece_ids))
    out.append(row)
  return out, sep_id


def check_ends_with_separator(rows: Sequence[Sequence[int]], sep_id: int, tokenizer: Any) -> None:
  """Raises unless every prompt row's last token is the separator id."""
  for i, row in enumerate(rows):
    if not row or row[-1] != sep_id:
      tail = tokenizer.decode(list(row[-4:])) if row else ""
      raise ValueError(
        f"prompt row {i} ends with {list(row[-4:])} ({tail!r}), not the thinking separator "
        f"id {sep_id}: the model would not read the separator it was trained on"
      )


# ----------------------------------------------------------------------------- padding
def bucket_length(longest: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= ``longest``; the largest bucket if none is (rows get truncated)."""
  for b in buckets:
    if b >= longest:
      return b
  return buckets[-1]


def pad_batch(
  seqs: Sequence[Sequence[int]],
  buckets: Sequence[int],
  pad_id: int,
  *,
  pad_left: bool,
  keep_end: bool,
  fixed_shape: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
  """Pad rows to a bucket length. Returns (ids, mask, number of truncated rows).

  ``keep_end`` truncates from the start (keeps the last tokens). ``fixed_shape`` always
  uses the largest bucket (needed when several hosts must agree on shapes).
  """
  longest = max((len(s) for s in seqs), default=0)
  length = buckets[-1] if fixed_shape else bucket_length(longest, buckets)
  ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(seqs), length), dtype=np.int32)
  truncated = 0
  for i, s in enumerate(seqs):
    if len(s) > length:
      truncated += 1
      s = s[len(s) - length :] if keep_end else s[:length]
    n = len(s)
    if n == 0:
      continue
    cols = slice(length - n, length) if pad_left else slice(0, n)
    ids[i, cols] = s
    mask[i, cols] = 1
  return ids, mask, truncated


def _count(stats: EncodeStats | None, part: str, n: int, cap: int) -> None:
  if n:
    log.warning("%d %s rows longer than the largest bucket (%d) were truncated", n, part, cap)
  if stats is not None:
    stats.truncated[part] += n


# ----------------------------------------------------------------------------- encoders
def encode_sft_batch(
  records: Sequence[Record],
  tokenizer: Any,
  templates: PromptTemplates,
  speed: Speed | int | str,
  buckets: Buckets,
  *,
  stats: EncodeStats | None = None,
  fixed_shapes: bool = False,
) -> dict[str, np.ndarray]:
  """Question / steps / answer parts of a supervised batch (see the module docstring)."""
  speed = Speed.of(speed)
  pad_id, eos_id = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
  q_texts = [templates.question_text(r.question, speed.prompt_value) for r in records]
  s_texts = [templates.steps_text(r.steps) for r in records]
  a_texts = [templates.answer_text(r.answer) for r in records]
  tokens, _ = encode_with_separator(tokenizer, q_texts + s_texts + a_texts, templates.separator)
  n = len(records)
  q_tok, s_tok, a_tok = tokens[:n], tokens[n : 2 * n], [t + [eos_id] for t in tokens[2 * n :]]
  q_ids, q_mask, q_tr = pad_batch(
    q_tok, buckets.question, pad_id, pad_left=True, keep_end=True, fixed_shape=fixed_shapes
  )
  s_ids, s_mask, s_tr = pad_batch(
    s_tok, buckets.steps, pad_id, pad_left=True, keep_end=False, fixed_shape=fixed_shapes
  )
  a_ids, a_mask, a_tr = pad_batch(
    a_tok, buckets.answer, pad_id, pad_left=False, keep_end=False, fixed_shape=fixed_shapes
  )
  _count(stats, "question", q_tr, buckets.question[-1])
  _count(stats, "steps", s_tr, buckets.steps[-1])
  _count(stats, "answer", a_tr, buckets.answer[-1])
  if stats is not None:
    stats.rows += n
  return {
    "question_ids": q_ids,
    "question_mask": q_mask,
    "steps_ids": s_ids,
    "steps_mask": s_mask,
    "answer_ids": a_ids,
    "answer_mask": a_mask,
    "speed": np.full((n,), speed.code, dtype=np.int32),
    "compression_factor": np.full((n,), speed.factor, dtype=np.int32),
  }


def encode_prompt_batch(
  questions: Sequence[str],
  tokenizer: Any,
  templates: PromptTemplates,
  speed: Speed | int | str | None,
  buckets: Buckets,
  *,
  append_separator: bool = True,
  stats: EncodeStats | None = None,
  fixed_shapes: bool = False,
) -> dict[str, np.ndarray]:
  """Left-padded generation prompts: question (+ speed suffix unless ``speed`` is None)
  (+ the separator that opens the reasoning, as the reference does at inference).

  The separator is its own id, as where training's steps part opens with it
  (:func:`encode_with_separator`); with ``append_separator`` every row is checked to
  end with it."""
  value = None if speed is None else Speed.of(speed).prompt_value
  suffix = templates.separator if append_separator else ""
  texts = [templates.question_text(q, value) + suffix for q in questions]
  tokens, sep_id = encode_with_separator(tokenizer, texts, templates.separator)
  if append_separator:
    check_ends_with_separator(tokens, sep_id, tokenizer)
  ids, mask, tr = pad_batch(
    tokens,
    buckets.question,
    int(tokenizer.pad_token_id),
    pad_left=True,
    keep_end=True,
    fixed_shape=fixed_shapes,
  )
  _count(stats, "question", tr, buckets.question[-1])
  return {"question_ids": ids, "question_mask": mask}
