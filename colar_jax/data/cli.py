"""``python -m colar_jax.data prepare|show`` - prepare a dataset once, look at examples.

    python -m colar_jax.data prepare gsm8k --source ../shared/data/gsm8k --data-dir DIR [--skip-bad]
    python -m colar_jax.data prepare synthetic --data-dir DIR [--option max_steps=6 ...]
    python -m colar_jax.data show gsm8k --data-dir DIR -n 3 [--split test] [--config natural]

A malformed source record stops ``prepare`` with exit code 1 and the one-line
``file:line: what is wrong`` message on stderr, unless ``--skip-bad``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from colar_jax.data.records import DataFormatError


def _parse_options(options: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects KEY=VALUE, got {opt!r}")
        out[key] = value
    return out


def _config(name: str, config: str | None, options: dict[str, str]):  # -> str | BuilderConfig | None
    if name == "synthetic":
        from colar_jax.data.builders import synthetic_config
        from colar_jax.data.synthetic import SyntheticTask

        if config is not None:
            raise SystemExit("synthetic takes --option KEY=VALUE, not --config")
        return synthetic_config(SyntheticTask.from_options(options))
    if options:
        raise SystemExit(f"--option is only for the synthetic dataset, not {name!r}")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colar_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("prepare", "show"):
        p = sub.add_parser(cmd)
        p.add_argument("dataset")
        p.add_argument("--data-dir", required=True, help="where prepared datasets live")
        p.add_argument("--config", default=None, help="builder config (gsm8k: equations|natural)")
        p.add_argument("--option", action="append", default=[], help="synthetic task KEY=VALUE (repeatable)")
        if cmd == "prepare":
            p.add_argument("--source", default=None, help="folder (or file) with the source data")
            p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
        else:
            p.add_argument("-n", type=int, default=3, help="number of examples")
            p.add_argument("--split", default=None, help="split to show (default: the first)")
    args = parser.parse_args(argv)

    from colar_jax.data import builders  # tfds import: after argument errors are reported

    if args.dataset not in builders.BUILDERS:
        print(f"unknown dataset {args.dataset!r}; known: {', '.join(sorted(builders.BUILDERS))}", file=sys.stderr)
        return 2
    try:
        config = _config(args.dataset, args.config, _parse_options(args.option))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "prepare":
        try:
            result = builders.prepare(
                args.dataset, args.data_dir, source=args.source, config=config, skip_bad=args.skip_bad
            )
        except DataFormatError as e:
            print(str(e).splitlines()[0], file=sys.stderr)
            return 1
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for split, size in sorted(result.sizes.items()):
            print(f"{split}: {size}")
        if args.skip_bad or any(result.skipped.values()):
            print(f"skipped: {sum(result.skipped.values())} {dict(result.skipped)}")
            for msg in result.metadata.get("skipped_examples", [])[:5]:
                print(f"  {msg}")
        return 0
    return _show(builders, args, config)


def _show(builders, args: argparse.Namespace, config) -> int:  # noqa: ANN001
    from colar_jax.data.records import Record

    builder = builders.get_builder(args.dataset, args.data_dir, config=config)
    if not builder.is_prepared():
        print(f"error: {args.dataset} is not prepared under {args.data_dir}; run prepare first", file=sys.stderr)
        return 1
    splits = list(builder.info.splits.keys())
    split = args.split or splits[0]
    if split not in splits:
        print(f"error: no split {split!r}; have {splits}", file=sys.stderr)
        return 1
    source = builder.as_data_source(split=split)
    label = f"{args.dataset}/{builder.builder_config.name}" if builder.builder_config else args.dataset
    print(f"{label} {split}: {len(source)}")
    for i in range(min(args.n, len(source))):
        rec = Record.from_example(source[i])
        print(f"--- [{i}] {rec.id}")
        print(f"question: {rec.question}")
        for j, step in enumerate(rec.steps):
            print(f"step {j + 1}: {step}")
        print(f"answer: {rec.answer}")
        for k, v in rec.extras.items():
            print(f"{k}: {v}")
    return 0
