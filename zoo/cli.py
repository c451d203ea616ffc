"""The `zoo` command line: one subcommand per module in zoo/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help); the module defines add_arguments(parser) and run(args)
COMMANDS = {
    "show": ("zoo.commands.show", "print a model's expanded layout (pattern string and per-layer table)"),
    "params": ("zoo.commands.params", "count total and active parameters on the meta device"),
    "train": ("zoo.commands.train", "train a model on a task"),
    "ablate": ("zoo.commands.ablate", "run a sweep of layouts and write a results table and plots"),
    "generate": ("zoo.commands.generate", "generate from a checkpoint with the recurrent state"),
    "convert": ("zoo.commands.convert", "convert a Hugging Face checkpoint to the zoo format"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="hybrid-zoo: hybrid sequence models from YAML")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_missing=module_name)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", None):
        print(f"zoo {args.command}: this installation lacks {args._missing}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                  # `zoo show ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
