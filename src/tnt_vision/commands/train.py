"""`tnt train`: the paper's recipe (or a YAML recipe) in one command; flags are generated from `TrainConfig`."""

from __future__ import annotations

import argparse
import json
import os

from ..config import FIELDS, make_config

_TYPES = {"int": int, "float": float, "str": str}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model (DeiT recipe by default)",
        description="Train a model. Defaults are the paper's recipe; -c RECIPE.yaml sets others; flags win.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("-c", "--config", dest="recipe", default=None, help="YAML recipe, e.g. recipes/digits.yaml")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, p.add_argument_group(group_name))
        add_field(group, name, str(f.type), f.metadata)
    p.set_defaults(func=run)


def add_field(group: argparse._ArgumentGroup, name: str, annotation: str, meta: dict) -> None:
    """One `--kebab-case` flag for a config field, typed from its annotation."""
    flag = "--" + name.replace("_", "-")
    kw = {"help": meta["help"]}
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    if annotation == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif annotation.startswith("tuple"):
        group.add_argument(flag, type=float, nargs=meta.get("nargs", 2), metavar="X", **kw)
    else:
        group.add_argument(flag, type=_TYPES[annotation.split(" |")[0]], **kw)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    if "scale" in overrides:
        overrides["scale"] = tuple(overrides["scale"])
    summary = train(make_config(args.recipe, **overrides))
    if summary.get("top1") is not None and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0
