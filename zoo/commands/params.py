"""`zoo params CONFIG [--set key=value ...] [--json]`: parameter counts, built on the meta device
(no memory, any size). Active parameters count, for each MoE layer, only top_k of its experts (the
router and any shared expert count fully). The breakdown is by layer type (each sublayer with its
pre-norm), shared blocks, their per-site parts, and embeddings + final norm + head.
"""
from __future__ import annotations

import json
import sys

from zoo.layout import LayoutError, parse_set_args


def add_arguments(parser) -> None:
    parser.add_argument("config", help="model YAML path or a name in configs/models/ (e.g. jamba-v0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set d_model=1024 (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help='print {"total": int, "active": int, "by_type": {...}}')


def count(config, **overrides) -> dict:
    """{"total", "active", "by_type"} of a config, built on the meta device."""
    from zoo.models import build_model

    model = build_model(config, device="meta", **overrides)
    return {"total": model.num_parameters(), "active": model.num_parameters(active=True),
            "by_type": model.parameters_by_type()}


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args) -> int:
    try:
        counts = count(args.config, **parse_set_args(args.set))
    except LayoutError as e:
        print(f"zoo params: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    total = counts["total"]
    print(f"{'total':<22}{total:>16,}  {_human(total):>9}")
    print(f"{'active':<22}{counts['active']:>16,}  {_human(counts['active']):>9}")
    for name, n in sorted(counts["by_type"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20}{n:>16,}  {_human(n):>9}  {100 * n / total:5.1f}%")
    return 0
