"""`zoo generate CHECKPOINT --prompt TEXT [--prompt ...] [--max-new-tokens N] [--temperature T]
[--top-k K] [--top-p P] [--seed S] [--cuda-graph auto|on|off]`: sample continuations with the
recurrent state.

Byte models (vocab 256) read and print UTF-8 text; token models read and print space-separated ids.
One prompt streams its continuation as it is generated; several prompts are one batch, each
printed when the batch is done.
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a zoo checkpoint directory, or a training run directory (its newest checkpoint)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (byte models) or space-separated token ids; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights dtype")
    parser.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"),
                        help="decode by replaying one CUDA graph per token: auto = when the model is on CUDA "
                             "and supports it (no MoE layers); on = required (an error otherwise)")


def run(args: argparse.Namespace) -> int:
    import torch

    from zoo.checkpoint import from_pretrained
    from zoo.generate import ByteStream, decode_tokens, encode_prompt, generate, is_byte_model

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        model = from_pretrained(args.checkpoint, device=device,
                                dtype=torch.bfloat16 if args.dtype == "bf16" else None)
        if model.config.get("model", "causal_lm") != "causal_lm":
            raise ValueError(f"{args.checkpoint} holds an image classifier; generation needs a causal_lm")
        byte_level = is_byte_model(model)
        prompts = [encode_prompt(p, byte_level) for p in args.prompt]
    except ValueError as e:
        print(f"zoo generate: error: {e}", file=sys.stderr)
        return 2

    stream = len(prompts) == 1
    decoder = ByteStream() if byte_level else None
    if stream:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()

    def on_token(tokens, emitted):
        if not emitted[0]:
            return
        tok = int(tokens[0])
        sys.stdout.write(decoder.feed(tok) if byte_level else f" {tok}")
        sys.stdout.flush()

    start = time.perf_counter()
    try:
        out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=on_token if stream else None,
                       cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph])
    except ValueError as e:
        print(f"\nzoo generate: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if stream:
        sys.stdout.write((decoder.flush() if byte_level else "") + "\n")
    else:
        for i, (prompt, row) in enumerate(zip(prompts, out)):
            text = decode_tokens(row, byte_level)
            print(f"[{i}] {text}")
    new = sum(len(r) - len(p) for r, p in zip(out, prompts))
    print(f"{new} new tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tok/s, batch {len(prompts)}, "
          f"{device})", file=sys.stderr)
    return 0
