"""End to end: training throughput of the zoo Trainer and decode speed of zoo.generate, against
mamba_ssm's language model on an H100 (DESIGN.md section 5).

    python benchmarks/end_to_end.py                 # CUDA: training, then decode (writes end_to_end.json to $OUT or .)
    python benchmarks/end_to_end.py --only train    # or --only decode
    python benchmarks/end_to_end.py --tiny          # the same code at toy sizes, on CPU (a smoke test)

Training: the three models of the table (d_model 1024, 48 layers, vocab 50280): Mamba-1 372M
(configs/models/mamba-370m.yaml), Mamba-2 368M (mamba2-370m.yaml with vocab 50280) and Mamba-2
with attention at 6 of the 48 sublayers, 354M (layers.attention_ratio 0.125: sublayers 6, 13,
..., 41; 16 heads of 64, RoPE). Each is a `zoo.train.Trainer` built from a run config, as `zoo
train` builds it (fp32 weights, bf16 autocast, fused AdamW, grad clip 1.0, no torch.compile),
on the `tokens` task over a file of uniformly random ids. The timed work is
`Trainer.train_step()`, the step `zoo train` runs (data windows read and copied to the GPU,
forward, fp32 cross-entropy, backward, clipping, optimizer), `--warmup` steps first (kernel
builds and autotuning), then `--steps` steps between two synchronisations. The second shape
re-uses the trainer with its batch size and task swapped (same step code, no second model build).
MFU = 6 N tokens/s / 989 TFLOP/s (dense bf16 of an H100 / H200 SXM), N = all parameters,
embeddings included, as the DESIGN table counts it. Peak memory: torch.cuda.max_memory_allocated
over that shape's steps.

Decode (--decode-models; default Mamba-1 and Mamba-2, the two with mamba_ssm numbers): bf16
weights, a prompt of 100 random ids, 256 new tokens, greedy, batch 1 and 32, through
`zoo.generate.generate` eagerly (cuda_graph=False) and through one CUDA graph per token
(cuda_graph=True). `generate tok/s` = batch x 256 / the wall time of the whole call (prefill,
graph capture and the host loop included; the best of --repeats calls after one warm-up call);
`step ms` = one decode step alone (eager: the model's forward on one token; graph:
CUDAGraphDecoder replay), the mean over 50 steps. The graph's tokens are checked to equal the
eager path's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import zoo  # noqa: E402
from zoo.config import load_run_config  # noqa: E402
from zoo.generate import CUDAGraphDecoder, cuda_graph_unsupported, generate, make_static  # noqa: E402
from zoo.tasks import build_task  # noqa: E402
from zoo.train import Trainer  # noqa: E402

PEAK_BF16_TFLOPS = 989.0

# mamba_ssm 2.3.2 on an H100 80GB (DESIGN.md section 5): training tok/s per shape; decode tok/s
# with CUDA graphs, bf16, 256 new tokens, per batch size
MAMBA_SSM_H100_TRAIN = {
    "mamba": {(8, 2048): 65.7e3, (2, 8192): 62.3e3},
    "mamba2": {(8, 2048): 55.5e3, (2, 8192): 49.3e3},
    "hybrid": {(8, 2048): 69.9e3, (2, 8192): 47.4e3},
}
MAMBA_SSM_H100_DECODE = {"mamba": {1: 630.0, 32: 17.7e3}, "mamba2": {1: 593.0, 32: 12.1e3}}


def model_overrides(name: str, tiny: bool) -> tuple[str | dict, dict]:
    """(model config, model.* overrides) of one of the table's models."""
    if tiny:
        base = {"d_model": 64, "vocab_size": 256, "tie_embeddings": True, "residual_in_fp32": True,
                "mamba": {"d_state": 16}, "mamba2": {"d_state": 32, "headdim": 16, "chunk_size": 16},
                "attention": {"n_heads": 4, "rope": True}}
        layers = {"mamba": {"count": 4, "mixer": "mamba"}, "mamba2": {"count": 4, "mixer": "mamba2"},
                  "hybrid": {"count": 8, "mixer": "mamba2", "attention_ratio": 0.25}}[name]
        return {**base, "layers": layers}, {}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "models")
    if name == "mamba":
        return os.path.join(root, "mamba-370m.yaml"), {}
    overrides = {"vocab_size": 50280}
    if name == "hybrid":
        overrides.update({"layers.attention_ratio": 0.125, "attention": {"n_heads": 16, "rope": True}})
    return os.path.join(root, "mamba2-370m.yaml"), overrides


def random_ids(path: str, vocab: int, n: int) -> None:
    np.save(path, np.random.default_rng(0).integers(0, vocab, size=n, dtype=np.int64).astype(np.int32))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(name: str, shapes, args, workdir: str) -> list[dict]:
    model, overrides = model_overrides(name, args.tiny)
    vocab = 256 if args.tiny else 50280
    ids = os.path.join(workdir, "ids.npy")
    if not os.path.exists(ids):
        random_ids(ids, vocab, 4 * max(b * l for b, l in shapes) + 10_000)

    def task(seq_len):
        return {"name": "tokens", "path": ids, "vocab_size": vocab, "seq_len": seq_len, "num_eval": 4,
                "val_fraction": 0.2}

    batch0, seq0 = shapes[0]
    run = load_run_config(
        {"model": model, "task": task(seq0),
         "trainer": {"steps": 10_000, "batch_size": batch0, "warmup": 10, "lr": 3e-4, "progress": False,
                     "log_every": 10_000}},
        {f"model.{k}": v for k, v in overrides.items()})
    trainer = Trainer(run, os.path.join(workdir, f"run-{name}"), log=lambda _msg: None)
    n_params = trainer.raw_model.num_parameters()
    device = trainer.device
    rows = []
    for batch, seq_len in shapes:
        if (batch, seq_len) != (batch0, seq0):
            trainer.cfg = dataclasses.replace(trainer.cfg, batch_size=batch)
            trainer.task = build_task(task(seq_len))
        row = {"model": name, "params_M": n_params / 1e6, "batch": batch, "seq_len": seq_len,
               "device": str(device), "autocast": str(trainer.amp_dtype).replace("torch.", ""),
               "fused_adamw": bool(trainer.optimizer.param_groups[0].get("fused"))}
        try:
            for _ in range(args.warmup):
                out = trainer.train_step()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = trainer.train_step()
            loss = float(out["loss"])                  # waits for the last step
            seconds = time.perf_counter() - t0
            tok_s = args.steps * batch * seq_len / seconds
            row.update(tok_s=tok_s, step_ms=1e3 * seconds / args.steps, loss=loss,
                       mfu=6 * n_params * tok_s / (PEAK_BF16_TFLOPS * 1e12),
                       peak_mem_GiB=(torch.cuda.max_memory_allocated(device) / 2**30
                                     if device.type == "cuda" else None),
                       mamba_ssm_h100_tok_s=MAMBA_SSM_H100_TRAIN[name].get((batch, seq_len)))
        except Exception as exc:                       # report and go on with the other rows
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def time_steps(fn, n: int, device) -> float:
    """Mean ms of fn() over n calls (after one call), between two synchronisations."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / n


def bench_decode(name: str, args, device: torch.device) -> list[dict]:
    model_cfg, overrides = model_overrides(name, args.tiny)
    model = zoo.build_model(model_cfg, device=device, **overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    vocab = model.config["vocab_size"]
    graph_ok = cuda_graph_unsupported(model) is None
    rows = []
    for batch in args.decode_batches:
        row = {"model": name, "params_M": model.num_parameters() / 1e6, "batch": batch,
               "prompt": args.prompt_len, "new_tokens": args.new_tokens, "dtype": str(dtype).replace("torch.", ""),
               "mamba_ssm_h100_graph_tok_s": MAMBA_SSM_H100_DECODE.get(name, {}).get(batch)}
        try:
            g = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, vocab, (batch, args.prompt_len), generator=g)
            outs = {}
            for mode in ("eager", "graph") if graph_ok else ("eager",):
                kw = dict(max_new_tokens=args.new_tokens, temperature=0, cuda_graph=mode == "graph")
                outs[mode] = generate(model, prompt, **kw)            # warm-up (kernel builds)
                best = float("inf")
                for _ in range(args.repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    generate(model, prompt, **kw)
                    sync(device)
                    best = min(best, time.perf_counter() - t0)
                row[f"{mode}_generate_s"] = best
                row[f"{mode}_tok_s"] = batch * args.new_tokens / best
            if graph_ok:
                row["graph_tokens_equal_eager"] = bool(torch.equal(outs["graph"], outs["eager"]))
            # one decode step alone, from the state after the prompt
            with torch.no_grad():
                state = model.init_state(batch, dtype=dtype, device=device, max_seqlen=args.prompt_len + 128)
                model(prompt.to(device), state=state)
                make_static(state)                     # attention caches as generate decodes them
                tok = torch.zeros(batch, dtype=torch.long, device=device)
                row["eager_step_ms"] = time_steps(lambda: model(tok[:, None], state=state), 50, device)
                if graph_ok:
                    step = CUDAGraphDecoder(model, state)
                    row["graph_step_ms"] = time_steps(lambda: step(tok), 50, device)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(train_rows: list[dict], decode_rows: list[dict], device_name: str, args) -> None:
    print(f"\n## Training ({device_name}; zoo Trainer.train_step: fp32 weights, bf16 autocast, fused AdamW)\n")
    print("| model | params | B x L | tok/s | MFU (6N) | step ms | peak mem GiB | mamba_ssm H100 tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in train_rows:
        if "error" in r:
            print(f"| {r['model']} | {r['params_M']:.1f}M | {r['batch']} x {r['seq_len']} | error: {r['error'][:120]} |||||")
            continue
        ref = r.get("mamba_ssm_h100_tok_s")
        versus = f"{ref / 1e3:.1f}k | {r['tok_s'] / ref:.2f}x" if ref else "- | -"
        print(f"| {r['model']} | {r['params_M']:.1f}M | {r['batch']} x {r['seq_len']} | {r['tok_s'] / 1e3:.1f}k | "
              f"{100 * r['mfu']:.1f}% | {r['step_ms']:.1f} | {fmt(r['peak_mem_GiB'], '.1f')} | {versus} |")
    print(f"\n## Decode ({device_name}; zoo.generate, greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens)\n")
    print("| model | batch | eager tok/s | graph tok/s | eager step ms | graph step ms | graph == eager | "
          "mamba_ssm H100 graph tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in decode_rows:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | error: {r['error'][:160]} ||||||")
            continue
        print(f"| {r['model']} | {r['batch']} | {fmt(r.get('eager_tok_s'), '.0f')} | {fmt(r.get('graph_tok_s'), '.0f')} | "
              f"{fmt(r.get('eager_step_ms'), '.2f')} | {fmt(r.get('graph_step_ms'), '.2f')} | "
              f"{r.get('graph_tokens_equal_eager', '-')} | {fmt(r.get('mamba_ssm_h100_graph_tok_s'), '.0f')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU: checks the script, times nothing useful")
    p.add_argument("--only", choices=("train", "decode"))
    p.add_argument("--models", default="mamba,mamba2,hybrid", help="of mamba, mamba2, hybrid")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--decode-models", default="mamba,mamba2")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        shapes = [(2, 64), (1, 128)]
        args.steps, args.warmup, args.repeats = min(args.steps, 2), min(args.warmup, 1), 1
        args.decode_batches, args.prompt_len, args.new_tokens = [1, 3], 5, 6
    else:
        shapes = [(8, 2048), (2, 8192)]
        args.decode_batches, args.prompt_len, args.new_tokens = [1, 32], 100, 256
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    train_rows, decode_rows = [], []
    with tempfile.TemporaryDirectory() as workdir:
        if args.only in (None, "train"):
            for name in models:
                train_rows += bench_train(name, shapes, args, workdir)
    if args.only in (None, "decode"):
        for name in [m.strip() for m in args.decode_models.split(",") if m.strip()]:
            decode_rows += bench_decode(name, args, device)
    out = os.path.join(os.environ.get("OUT", "."), "end_to_end.json")
    with open(out, "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "train": train_rows,
                   "decode": decode_rows}, f, indent=1)
    print_tables(train_rows, decode_rows, device_name, args)


if __name__ == "__main__":
    main()
