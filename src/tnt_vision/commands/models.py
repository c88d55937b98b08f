"""`tnt models`: the registered variants with parameters and FLOPs, measured and from the paper."""

from __future__ import annotations

import argparse
import json

from ..models import count_flops, count_params, create_model, get_spec, list_models, paper_flops


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models with params and FLOPs")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'tnt_s*'")
    p.add_argument("--img-size", type=int, default=None, help="count FLOPs at this input size")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=run)


def model_table(pattern: str = "*", img_size: int | None = None) -> list[dict]:
    """One row per model: measured params and multiply-adds, Eq. 14/17 block FLOPs, the paper's figures."""
    rows = []
    for name in list_models(pattern):
        spec = get_spec(name)
        model = create_model(name, **({"img_size": img_size} if img_size else {}))
        rows.append(
            {
                "name": name,
                "params_m": count_params(model) / 1e6,
                "flops_g": count_flops(model) / 1e9,
                "eq17_flops_g": paper_flops(model.cfg) / 1e9,
                "paper_params_m": spec.paper_params_m,
                "paper_flops_g": spec.paper_flops_g,
                "what": spec.description,
            }
        )
    return rows


def _count(value: float | None, unit: str) -> str:
    """Giga-units with two decimals; mega-units for the small presets; '-' where the paper has no figure."""
    if value is None:
        return "-"
    return f"{value:.2f}{unit}" if value >= 0.1 else f"{value * 1e3:.2f}{'M' if unit == 'G' else 'K'}"


def format_table(rows: list[dict]) -> str:
    head = f"{'model':26} {'params':>8} {'paper':>6} {'FLOPs':>7} {'Eq.17':>7} {'paper':>6}  what"
    lines = [head, "-" * len(head)]
    for r in rows:
        paper_p = f"{r['paper_params_m']:.1f}M" if r["paper_params_m"] else "-"
        paper_f = f"{r['paper_flops_g']:.1f}G" if r["paper_flops_g"] else "-"
        lines.append(
            f"{r['name']:26} {_count(r['params_m'], 'M'):>8} {paper_p:>6} {_count(r['flops_g'], 'G'):>7} "
            f"{_count(r['eq17_flops_g'], 'G'):>7} {paper_f:>6}  {r['what']}"
        )
    lines.append("FLOPs = multiply-adds of one image, counted with torch.utils.flop_counter (attention included);")
    lines.append("Eq.17 = the paper's formula for the transformer blocks only (Eq. 14 for plain blocks).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = model_table(args.pattern, args.img_size)
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print(format_table(rows))
    return 0
