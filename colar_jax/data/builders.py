"""TFDS builders (``array_record`` files, no TensorFlow needed) for every dataset.

Why this shape:
  * ``GeneratorBasedBuilder`` + ``file_format='array_record'`` prepares without TF and is
    read back with ``builder.as_data_source()`` (random access, what grain wants).
    ``as_dataset`` needs TF and is never used. Verified with tensorflow-datasets 4.9.10.
  * ``dataset_info_from_configs`` reads package metadata files we do not ship, so
    ``_info`` builds ``tfds.core.DatasetInfo`` directly.
  * Builders are created with ``skip_registration=True``: they are looked up through
    :data:`BUILDERS`, never through the global tfds catalog, so our names (``gsm8k``,
    ``math``) can not clash with catalog datasets.
  * The source files are the tfds *manual dir*; nothing is downloaded. Preparation is
    idempotent: a prepared ``<data_dir>/<name>/<config>/<version>`` is reused as is.
  * Bad records: the parsers raise :class:`DataFormatError` (``file:line: what``); with
    ``skip_bad=True`` they are dropped, counted per source file and stored in the
    dataset's metadata (``metadata.json``: ``skipped``, ``skipped_examples``).

Record features: ``question`` (Text), ``steps`` (Sequence(Text)), ``answer`` (Text),
``id`` (Text, ``file:line`` of the source) and, for MATH, ``level`` and ``type``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils.epath import Path  # keeps gs:// sources (pathlib would not)

from colar_jax.data import parsers
from colar_jax.data.records import Record
from colar_jax.data.synthetic import SyntheticTask, generate_splits

_MAX_SKIPPED_EXAMPLES = 20


class _Base(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: features, manual dir, bad-record bookkeeping."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the folder holding the source files as --source (tfds manual_dir)."
  )
  EXTRA_KEYS: tuple[str, ...] = ()
  DESCRIPTION = ""
  # tfds looks for a checksums file next to the builder's code through
  # ``importlib_resources`` (a package it only declares for Python < 3.9, so it is missing
  # here). We download nothing, so there is no checksums file: say so directly.
  code_path = None

  def __init__(
    self, *, skip_bad: bool = False, source_file: str | None = None, **kwargs: Any
  ) -> None:
    self._skip_bad = skip_bad
    self._source_file = source_file
    self._skipped: dict[str, list[str]] = {}
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # tfds prints these two banners to stdout; the CLI's stdout is the split sizes only.
  def _log_download_bytes(self) -> None:
    logging.info("preparing %s (%s) under %s", self.name, self.builder_config_name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("prepared %s under %s", self.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      "question": tfds.features.Text(),
      "steps": tfds.features.Sequence(tfds.features.Text()),
      "answer": tfds.features.Text(),
      "id": tfds.features.Text(),
    }
    features.update({k: tfds.features.Text() for k in self.EXTRA_KEYS})
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(),
    )

  # -- helpers for subclasses ------------------------------------------------------
  def _read(
    self, path: Path, reader: Callable[..., Iterator[Record]], **kw: Any
  ) -> Iterator[Record]:
    skipped = self._skipped.setdefault(path.name, [])
    return reader(path, skip_bad=self._skip_bad, skipped=skipped, **kw)

  def _find_file(self, manual_dir: Path, preferred: Sequence[str], pattern: str) -> Path:
    """The explicit ``source_file``, else a preferred name, else the only ``pattern`` match."""
    if self._source_file:
      path = manual_dir / self._source_file
      if not path.is_file():
        raise FileNotFoundError(f"{path}: source file not found")
      return path
    for name in preferred:
      if (manual_dir / name).is_file():
        return manual_dir / name
    matches = sorted(manual_dir.glob(pattern))
    if len(matches) != 1:
      raise FileNotFoundError(
        f"{manual_dir}: expected one of {list(preferred)} or exactly one {pattern} file, found {len(matches)}"
      )
    return matches[0]

  def _generate_examples(self, records: Iterable[Record]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, rec in enumerate(records):
      yield i, rec.to_example(self.EXTRA_KEYS)
    self._store_skips()

  def _store_skips(self) -> None:
    """Called when each split's generator finishes (before tfds writes dataset info)."""
    meta = self.info.metadata
    meta["skip_bad"] = self._skip_bad
    meta["skipped"] = {name: len(msgs) for name, msgs in self._skipped.items()}
    meta["skipped_examples"] = [m for msgs in self._skipped.values() for m in msgs][
      :_MAX_SKIPPED_EXAMPLES
    ]
    reasons: dict[str, int] = {}
    for msgs in self._skipped.values():
      for m in msgs:
        reasons[skip_reason(m)] = reasons.get(skip_reason(m), 0) + 1
    meta["skipped_reasons"] = reasons


_WHERE = re.compile(r"^.*?:\d+: ")  # the ``file:line: `` a parser error starts with
# What varies per record: (details), the value after "non-numeric <what>" or a last ": ".
_VALUE = re.compile(r"\s*\([^)]*\)|: '.*'$")
_NON_NUMERIC = re.compile(r"^(non-numeric \w+) .*$")


def skip_reason(message: str) -> str:
  """The kind of a parser error, without its place or values:
  ``a.jsonl:3: non-numeric answer 'x'`` -> ``non-numeric answer``."""
  kind = _VALUE.sub("", _WHERE.sub("", message, count=1))
  return _NON_NUMERIC.sub(r"\1", kind).strip(" :") or message


@dataclasses.dataclass(eq=False)
class Gsm8kConfig(tfds.core.BuilderConfig):
  """``steps_mode``: ``equations`` (``<<48/2=24>>`` chain, GSM8k-Aug style) or ``natural``."""

  steps_mode: str = "equations"
  val_size: int = 500
  val_seed: int = 0
  drop_empty_chains: bool = True


class Gsm8k(_Base, skip_registration=True):
  """Original GSM8k jsonl; ``val`` is a fixed seeded sample carved out of ``train``.

  Train problems without any calculator annotation (95 of 7473) have an empty
  equation chain; they are dropped from train/val by default (nothing to learn for a
  reasoning-chain method) and counted in metadata ``dropped_empty_chain``. The selection
  is made on the equation chain in both configs, so ``equations`` and ``natural`` have
  the same questions in every split. Test keeps all 1319 problems (18 have an empty
  chain), like the iCoT/CoLaR test set, so accuracies stay comparable.
  """

  name = "gsm8k"
  DESCRIPTION = "GSM8k (OpenAI grade-school math) as question / steps / answer."
  BUILDER_CONFIGS = [
    Gsm8kConfig(name="equations", description="steps are the <<...>> calculator equations"),
    Gsm8kConfig(name="natural", steps_mode="natural", description="steps are solution lines"),
  ]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg: Gsm8kConfig = self.builder_config  # type: ignore[assignment]
    manual = Path(dl_manager.manual_dir)
    train_path, test_path = manual / "train.jsonl", manual / "test.jsonl"
    for p in (train_path, test_path):
      if not p.is_file():
        raise FileNotFoundError(f"{p}: GSM8k source file not found")
    train = self._load(train_path, cfg.steps_mode)
    eq_train = train
    if cfg.steps_mode != "equations":  # select on the equation chain in every config
      eq_train = list(parsers.read_gsm8k_jsonl(train_path, skip_bad=True))
    keep = [r for r, e in zip(train, eq_train, strict=True) if e.steps or not cfg.drop_empty_chains]
    self.info.metadata["dropped_empty_chain"] = len(train) - len(keep)
    perm = np.random.default_rng(cfg.val_seed).permutation(len(keep))
    val_idx = set(perm[: cfg.val_size].tolist())
    return {
      "train": self._generate_examples(r for i, r in enumerate(keep) if i not in val_idx),
      "val": self._generate_examples(r for i, r in enumerate(keep) if i in val_idx),
      "test": self._generate_examples(self._load(test_path, cfg.steps_mode)),
    }

  def _load(self, path: Path, steps_mode: str) -> list[Record]:
    return list(self._read(path, parsers.read_gsm8k_jsonl, steps_mode=steps_mode))


class Gsm8kAug(_Base, skip_registration=True):
  """iCoT GSM8k-Aug text files ``question||<<eq>> <<eq>> #### answer``; one split per ``*.txt``."""

  name = "gsm8k_aug"
  DESCRIPTION = "GSM8k-Aug (iCoT format): equation-only reasoning chains."

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual = Path(dl_manager.manual_dir)
    files = sorted(manual.glob("*.txt"))
    if not files:
      raise FileNotFoundError(f"{manual}: no *.txt GSM8k-Aug split files")
    return {
      p.stem.replace("-", "_"): self._generate_examples(self._read(p, parsers.read_gsm8k_aug_txt))
      for p in files
    }


class GsmHard(_Base, skip_registration=True):
  """PAL GSM-Hard jsonl (``input``/``code``/``target``); test only, program = single step."""

  name = "gsm_hard"
  DESCRIPTION = "GSM-Hard: GSM8k with large numbers; test only."

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    path = self._find_file(
      Path(dl_manager.manual_dir), ["gsmhardv2.jsonl", "gsmhard.jsonl"], "*.jsonl"
    )
    recs = self._read(path, parsers.read_jsonl_objects, parse=parsers.parse_gsm_hard_obj)
    return {"test": self._generate_examples(recs)}


class Svamp(_Base, skip_registration=True):
  """SVAMP.json list (``Body``/``Question``/``Equation``/``Answer``); test only."""

  name = "svamp"
  DESCRIPTION = "SVAMP arithmetic word problems; test only."

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    path = self._find_file(Path(dl_manager.manual_dir), ["SVAMP.json", "svamp.json"], "*.json")
    recs = self._read(path, parsers.read_json_list, parse=parsers.parse_svamp_obj)
    return {"test": self._generate_examples(recs)}


class MultiArith(_Base, skip_registration=True):
  """MultiArith.json list (``sQuestion``/``lEquations``/``lSolutions``); test only."""

  name = "multiarith"
  DESCRIPTION = "MultiArith arithmetic word problems; test only."

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    path = self._find_file(
      Path(dl_manager.manual_dir), ["MultiArith.json", "multiarith.json"], "*.json"
    )
    recs = self._read(path, parsers.read_json_list, parse=parsers.parse_multiarith_obj)
    return {"test": self._generate_examples(recs)}


class Math(_Base, skip_registration=True):
  r"""Hendrycks MATH: ``<split>/<subject>/<id>.json`` trees or ``<split>.jsonl`` files.

  Answer = content of the last ``\boxed{...}`` (nested braces balanced); the whole
  solution is the single step; ``level`` and ``type`` are kept.
  """

  name = "math"
  DESCRIPTION = "MATH competition problems."
  EXTRA_KEYS = ("level", "type")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual = Path(dl_manager.manual_dir)
    splits: dict[str, Any] = {}
    for split in ("train", "test"):
      tree, jsonl = manual / split, manual / f"{split}.jsonl"
      if tree.is_dir():
        recs = self._read_tree(tree)
      elif jsonl.is_file():
        recs = self._read(jsonl, parsers.read_jsonl_objects, parse=parsers.parse_math_obj)
      else:
        continue
      splits[split] = self._generate_examples(recs)
    if not splits:
      raise FileNotFoundError(f"{manual}: no train/ or test/ folder nor train.jsonl/test.jsonl")
    return splits

  def _read_tree(self, tree: Path) -> Iterator[Record]:
    skipped = self._skipped.setdefault(f"{tree.name}/", [])
    return parsers.read_math_tree(tree, skip_bad=self._skip_bad, skipped=skipped)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  task: SyntheticTask = dataclasses.field(default_factory=SyntheticTask)


def synthetic_config(task: SyntheticTask) -> SyntheticConfig:
  """The builder config for ``task`` (its name encodes every parameter)."""
  return SyntheticConfig(name=task.config_name(), task=task, description=f"synthetic task {task}")


class Synthetic(_Base, skip_registration=True):
  """The seeded modular-arithmetic chain task (see :mod:`colar_jax.data.synthetic`)."""

  name = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = None  # generated, no source files
  DESCRIPTION = "Synthetic multi-step modular arithmetic with equation-chain steps."
  BUILDER_CONFIGS = [synthetic_config(SyntheticTask())]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg: SyntheticConfig = self.builder_config  # type: ignore[assignment]
    return {
      split: self._generate_examples(recs) for split, recs in generate_splits(cfg.task).items()
    }


BUILDERS: dict[str, type[_Base]] = {
  b.name: b for b in (Gsm8k, Gsm8kAug, GsmHard, Svamp, MultiArith, Math, Synthetic)
}
NEEDS_SOURCE = {name for name, b in BUILDERS.items() if b.MANUAL_DOWNLOAD_INSTRUCTIONS}


# ------------------------------------------------------------------------------ entry points
def get_builder(
  name: str,
  data_dir: str | Path,
  *,
  config: str | tfds.core.BuilderConfig | None = None,
  source: str | Path | None = None,
  skip_bad: bool = False,
) -> _Base:
  """A builder for dataset ``name`` under ``data_dir``.

  ``source`` (only needed to prepare) is the folder with the source files, or one source
  file (its folder becomes the manual dir). ``config`` is a config name, a BuilderConfig
  (e.g. :func:`synthetic_config`) or None for the first (default) config.
  """
  if name not in BUILDERS:
    raise KeyError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  source_file = None
  if source is not None and Path(source).is_file():
    source_file = Path(source).name
  return BUILDERS[name](
    data_dir=str(data_dir), config=config, skip_bad=skip_bad, source_file=source_file
  )


def _manual_dir(source: str | Path | None) -> str | None:
  if source is None:
    return None
  path = Path(source)
  if not path.exists():
    raise FileNotFoundError(f"{path}: source not found")
  return str(path.parent if path.is_file() else path)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  sizes: dict[str, int]
  skipped: dict[str, int]
  metadata: dict[str, Any]


def prepare(
  name: str,
  data_dir: str | Path,
  *,
  source: str | Path | None = None,
  config: str | tfds.core.BuilderConfig | None = None,
  skip_bad: bool = False,
) -> PrepareResult:
  """Prepare (once) and return split sizes plus the skipped-record counts.

  Raises :class:`DataFormatError` on the first malformed record unless ``skip_bad``.
  """
  if name in NEEDS_SOURCE and source is None and not _is_prepared(name, data_dir, config):
    raise ValueError(f"dataset {name!r} needs --source (the folder with its files)")
  builder = get_builder(name, data_dir, config=config, source=source, skip_bad=skip_bad)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=_manual_dir(source))
  )
  meta = dict(builder.info.metadata or {})
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  return PrepareResult(sizes=sizes, skipped=dict(meta.get("skipped", {})), metadata=meta)


def _is_prepared(name: str, data_dir: str | Path, config: Any) -> bool:
  return bool(get_builder(name, data_dir, config=config).is_prepared())


def load_source(
  name: str,
  data_dir: str | Path,
  split: str,
  *,
  config: str | tfds.core.BuilderConfig | None = None,
) -> Sequence[dict[str, Any]]:
  """Random-access data source of a prepared split (``len`` and ``[i]``; values are bytes).

  Feed it to :func:`colar_jax.data.pipeline.make_train_dataset`, or wrap items with
  :meth:`Record.from_example`.
  """
  builder = get_builder(name, data_dir, config=config)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"dataset {name!r} ({builder.builder_config.name}) is not prepared under {data_dir}"
    )
  return builder.as_data_source(split=split)


# ----------------------------------------------------------------------------- run config
def synthetic_task(section: Any) -> SyntheticTask:
  """The task of a ``config.Synthetic`` section (same field names)."""
  return SyntheticTask(
    **{f.name: getattr(section, f.name) for f in dataclasses.fields(SyntheticTask)}
  )


def builder_config(data: Any) -> Any:
  """The tfds builder config of a ``config.Data`` section: the run's own synthetic task
  (the builder's default task is another dataset), else None (the builder's default)."""
  return synthetic_config(synthetic_task(data.synthetic)) if data.dataset == "synthetic" else None


def load_questions(
  data: Any, split: str, data_dir: str | Path, source: str | None = None
) -> tuple[list[str], list[str]]:
  """(questions, gold answers) of ``split`` of the ``config.Data`` section's dataset,
  preparing it once if needed."""
  cfg = builder_config(data)
  prepare(data.dataset, data_dir, source=source or data.source or None, config=cfg)
  recs = [Record.from_example(ex) for ex in load_source(data.dataset, data_dir, split, config=cfg)]
  return [r.question for r in recs], [r.answer for r in recs]
