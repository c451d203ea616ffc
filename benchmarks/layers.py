"""Forward and forward+backward time of each layer (Mamba, Mamba-2, attention, MLP, MoE) at a small and
a medium configuration, on CUDA (bf16, CUDA-event timing, median of reps) or CPU (fp32, few reps).

    python benchmarks/layers.py                     # every layer, both sizes, printed as a table
    python benchmarks/layers.py --layers attention moe --sizes medium --json out.json

Not a test: numbers depend on the machine. Layers whose module cannot be imported yet are skipped with
a note. Tokens/s counts batch * seqlen per forward (or forward+backward).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.timing import cuda_median_ms  # noqa: E402

# name -> (module, class, kwargs given d_model). Widths follow the usual ratios: attention heads of
# 64 channels with GQA 4:1 and RoPE, SwiGLU d_ff = 8/3 d rounded to 64, MoE 8 experts top-2 each of
# width d (Mixtral-like active compute), Mamba-1 d_state 16, Mamba-2 d_state 128 headdim 64.
LAYERS = {
    "mamba": ("layers.mamba", "Mamba", lambda d: {"d_model": d, "d_state": 16}),
    "mamba2": ("layers.mamba2", "Mamba2", lambda d: {"d_model": d, "d_state": 128, "headdim": 64}),
    "attention": ("layers.attention", "Attention",
                  lambda d: {"d_model": d, "n_heads": max(d // 64, 1), "n_kv_heads": max(d // 256, 1), "rope": True}),
    "mlp": ("layers.mlp", "MLP", lambda d: {"d_model": d, "d_ff": 64 * round(8 * d / 3 / 64)}),
    "moe": ("layers.moe", "MoE", lambda d: {"d_model": d, "d_ff": d, "num_experts": 8, "top_k": 2}),
}

# size -> (batch, seqlen, d_model), per device kind.
SIZES = {
    "cuda": {"small": (8, 1024, 512), "medium": (4, 4096, 2048)},
    "cpu": {"small": (2, 128, 128), "medium": (2, 512, 256)},
}


def _time_cuda(fn, reps: int) -> float:
    return cuda_median_ms(fn, reps, warmup=3)


def _time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _output(y):
    return y[0] if isinstance(y, tuple) else y


def bench_layer(name: str, batch: int, seqlen: int, d_model: int, device: str, dtype: torch.dtype, reps: int):
    module_name, cls_name, kwargs_for = LAYERS[name]
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        return {"skipped": f"{module_name}.{cls_name} not importable ({exc})"}
    kwargs = kwargs_for(d_model)
    layer = cls(**kwargs, device=device, dtype=dtype)
    x = torch.randn(batch, seqlen, d_model, device=device, dtype=dtype, requires_grad=True)
    timer = _time_cuda if device == "cuda" else _time_cpu

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        y = layer(x)
        loss = _output(y).float().square().mean()
        if isinstance(y, tuple):
            loss = loss + sum(y[1].values())
        loss.backward()

    fwd = timer(forward, reps)
    fwd_bwd = timer(forward_backward, reps)
    tokens = batch * seqlen
    return {"kwargs": kwargs, "params": sum(p.numel() for p in layer.parameters()),
            "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
            "fwd_tok_per_s": tokens / fwd * 1e3, "fwd_bwd_tok_per_s": tokens / fwd_bwd * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 CUDA, 3 CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = args.reps or (20 if device == "cuda" else 3)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# {machine}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}, median of {reps}")
    header = f"{'layer':<10} {'size':<7} {'batch x seqlen x d':<20} {'params':>10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd tok/s':>11} {'f+b tok/s':>11}"
    print(header)
    print("-" * len(header))
    results = []
    for size in args.sizes:
        batch, seqlen, d_model = SIZES[device][size]
        for name in args.layers:
            torch.manual_seed(0)
            row = {"layer": name, "size": size, "batch": batch, "seqlen": seqlen, "d_model": d_model,
                   **bench_layer(name, batch, seqlen, d_model, device, dtype, reps)}
            results.append(row)
            shape = f"{batch} x {seqlen} x {d_model}"
            if "skipped" in row:
                print(f"{name:<10} {size:<7} {shape:<20} skipped: {row['skipped']}")
                continue
            print(f"{name:<10} {size:<7} {shape:<20} {row['params']:>10,} {row['fwd_ms']:>9.3f} "
                  f"{row['fwd_bwd_ms']:>11.3f} {row['fwd_tok_per_s']:>11,.0f} {row['fwd_bwd_tok_per_s']:>11,.0f}")
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                         "dtype": str(dtype), "reps": reps, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
