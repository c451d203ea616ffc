"""`zoo show CONFIG [--set key=value ...] [--yaml]`: a model's expanded layout, without building it.

Validates the config completely (it is built on the meta device, which costs no memory) and prints
the compact pattern string (one symbol per residual sublayer) and a per-sublayer table with the
kwargs that differ from each layer's defaults; `--yaml` prints the whole canonical config instead.
"""
from __future__ import annotations

import sys

from zoo.layout import (SHOW_SYMBOLS, LayoutError, dump_config, non_default_kwargs, parse_set_args,
                        pattern_string)


def add_arguments(parser) -> None:
    parser.add_argument("config", help="model YAML path or a name in configs/models/ (e.g. jamba-v0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set layers.attention_ratio=0.25 (repeatable)")
    parser.add_argument("--yaml", action="store_true", help="print the full canonical config as YAML")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def format_layout(cfg: dict) -> str:
    layout = cfg["layout"]
    kind = cfg["model"]
    head = f"{cfg['name']}  ({kind}, d_model {cfg['d_model']}"
    head += f", vocab {cfg['vocab_size']})" if kind == "causal_lm" else f", {cfg['image']['num_classes']} classes)"
    counts: dict[str, int] = {}
    for e in layout:
        counts[e["type"]] = counts.get(e["type"], 0) + 1
    used = [t for t in SHOW_SYMBOLS if t in counts]
    lines = [head,
             f"sublayers: {len(layout)}  (" + ", ".join(f"{counts[t]} {t}" for t in used) + ")",
             "pattern:   " + pattern_string(layout),
             "legend:    " + "  ".join(f"{SHOW_SYMBOLS[t]} {t}" for t in used),
             ""]
    width = len(str(len(layout) - 1))
    main_index = 0
    for e in layout:
        kwargs = non_default_kwargs(e)
        if e["type"] == "shared":
            label = " " * width
            text = f"block={e['block']} site={e['site']}"
        else:
            label = str(main_index).rjust(width)
            main_index += 1
            text = " ".join(f"{k}={_fmt(v)}" for k, v in kwargs.items())
        lines.append(f"{label}  {e['type']:<13} {text}".rstrip())
    for name, spec in cfg["shared"].items():
        lines.append("")
        lines.append(f"shared block {name}: input={spec['input']} output={spec['output']} "
                     f"lora_rank={spec['lora_rank']}" + (f" lora_targets={_fmt(spec['lora_targets'])}"
                                                        if spec["lora_rank"] else ""))
        for j, b in enumerate(spec["blocks"]):
            text = " ".join(f"{k}={_fmt(v)}" for k, v in non_default_kwargs(b).items())
            lines.append(f"  {j}  {b['type']:<11} d_model={b['d_model']} {text}".rstrip())
    return "\n".join(lines)


def run(args) -> int:
    try:
        # building on the meta device costs no memory and runs every layer's own argument checks
        # (e.g. n_heads dividing d_model), so a config that `show` accepts also builds
        from zoo.models import build_model
        cfg = build_model(args.config, device="meta", **parse_set_args(args.set)).config
    except LayoutError as e:
        print(f"zoo show: {e}", file=sys.stderr)
        return 2
    print(dump_config(cfg) if args.yaml else format_layout(cfg))
    return 0
