"""`zoo ablate SWEEP.yaml [--out DIR]`: train every variant of a sweep on the same data and budget,
then write results.csv, results.md and plots (see zoo/ablate.py for the sweep format)."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/ablations/attention-ratio.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<sweep name>); "
                                                     "running again resumes, skipping finished variants")
    parser.add_argument("--jobs", type=int, default=None,
                        help="variants trained at once, each with cpu_count/jobs threads (default: the "
                             "sweep's `jobs`, else 1; on a CPU use the number of cores)")
    parser.add_argument("--in-process", action="store_true",
                        help="train variants in this process (faster start; peak memory is then the sweep's)")


def run(args: argparse.Namespace) -> int:
    from zoo.ablate import run_sweep

    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.sweep))[0])
    try:
        run_sweep(args.sweep, out, in_process=args.in_process, jobs=args.jobs, log=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"zoo ablate: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"zoo ablate: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(out, "results.md")) as f:
        print(f.read())
    return 0
