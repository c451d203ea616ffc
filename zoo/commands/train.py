"""`zoo train CONFIG [--set key=value ...] [--resume] [--out DIR]`: train a model on a task.

Under `torchrun --nproc-per-node N -m zoo.cli train ...` every process trains on its own shard
of the batch stream (DDP, or FSDP2 with --set trainer.parallel=fsdp).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (model + task + trainer), e.g. configs/train/mqar-hybrid.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value with a dotted key, e.g. --set trainer.lr=3e-4 "
                             "--set model.d_model=128 (repeatable; values are YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out (identical to an uninterrupted run)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def default_out(config_path: str) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def run(args: argparse.Namespace) -> int:
    from zoo.config import load_run_config
    from zoo.train import Trainer

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("trainer.progress=false")
    try:
        run_cfg = load_run_config(args.config, overrides)
        trainer = Trainer(run_cfg, args.out or default_out(args.config), resume=args.resume)
    except ValueError as e:            # config, layout and task errors name the key and the fix
        print(f"zoo train: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        keep = ("steps", "tokens", "final_loss", "eval_loss", "metric_name", "metric", "tokens_per_s",
                "peak_memory_mb", "params_total", "layout", "wall_s")
        print(json.dumps({k: summary[k] for k in keep}, indent=None))
        print(f"checkpoint: {trainer.out_dir}/checkpoints (zoo generate {trainer.out_dir} ...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m zoo.commands.train ...`: the same command without the other CLI modules (the
    ablation runner starts each variant this way)."""
    parser = argparse.ArgumentParser(prog="zoo train")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
