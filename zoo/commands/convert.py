"""zoo convert: Hugging Face checkpoint -> zoo format (or back, with --to hf)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a Hugging Face checkpoint directory (config.json + safetensors), "
                                    "or with --to hf a zoo checkpoint directory")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=("zoo", "hf"), default="zoo",
                        help="zoo (default): HF -> zoo format; hf: zoo -> HF format (mamba, mamba2, jamba layouts)")
    parser.add_argument("--model-type", default=None,
                        help="with --to hf: mamba | falcon_mamba | mamba2 | jamba (default: inferred from the layout)")


def run(args: argparse.Namespace) -> int:
    from zoo.checkpoint import from_pretrained, save_pretrained
    from zoo.hf import export_hf, load_hf

    if args.to == "zoo":
        model = load_hf(args.src)
        save_pretrained(model, args.dst)
    else:
        model = from_pretrained(args.src)
        export_hf(model, args.dst, model_type=args.model_type)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"wrote {args.dst} ({args.to} format): {model.config.get('name', '')}, {len(model.layout)} sublayers, "
          f"{total:,} parameters")
    return 0
