"""`tnt <verb>`: a thin command line over the library. Each verb lives in `tnt_vision.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import UserError

# One module per verb; each has `register(subparsers)` that adds its parser and sets `func(args) -> int`.
VERBS = ("models", "convert", "train", "eval", "predict", "viz", "bench", "export", "detect", "segment")


class _Parser(argparse.ArgumentParser):
    """Usage errors (a bad flag, a missing argument) as one line with exit status 2, like `UserError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tnt", description="Transformer in Transformer: models, training, tools.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"tnt_vision.commands.{verb.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"tnt {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tnt {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
