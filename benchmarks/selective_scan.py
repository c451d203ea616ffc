"""Selective scan: correctness at real sizes and timings of the fused CUDA kernel.

    python benchmarks/selective_scan.py [--quick] [--json PATH]

For each shape of DESIGN.md section 5 (bf16, z, D, delta bias, softplus, groups 1): checks the fused
kernel's output (and at the first shape all gradients) against reference.selective_scan_ref on the
same inputs, with outputs poisoned with NaN first; then times forward and forward+backward (medians
of triton.testing.do_bench) of the fused kernel in its launch variants, the reference (one timed
repetition at large sizes: it is a chunked PyTorch scan), and mamba_ssm when it is installed, and
prints achieved bandwidth against a measured device-to-device copy. mamba_ssm's H100 numbers from
DESIGN.md are printed as the bar.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import cuda_median_ms  # noqa: E402
from kernels.selective_scan import fused  # noqa: E402
from kernels.selective_scan.reference import selective_scan_ref  # noqa: E402

SHAPES = [  # batch, dim, seqlen, dstate; mamba_ssm 2.3.2 on an H100 (fwd ms, fwd+bwd ms)
    ((8, 2048, 2048, 16), (0.594, 3.056)),
    ((2, 2048, 8192, 16), (0.748, 3.353)),
    ((8, 4096, 2048, 16), (1.171, 6.013)),
    ((4, 2048, 4096, 64), (2.031, 11.46)),
]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(batch, dim, seqlen, dstate, seed=0, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def rn(*shape, dtype=bf, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dtype)

    x = dict(u=rn(batch, dim, seqlen), delta=rn(batch, dim, seqlen, scale=0.5, shift=-1.0),
             A=-(torch.arange(1, dstate + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)),
             B=rn(batch, 1, dstate, seqlen), C=rn(batch, 1, dstate, seqlen),
             D=rn(dim, dtype=torch.float32), z=rn(batch, dim, seqlen),
             delta_bias=rn(dim, dtype=torch.float32, scale=0.3))
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def bytes_moved(batch, dim, seqlen, dstate, backward=False):
    """Fewest bytes: each bf16 input read once, each output written once (fp32 dB, dC)."""
    rows = batch * dim * seqlen * 2
    bc = 2 * batch * dstate * seqlen * 2
    if not backward:
        return 4 * rows + bc                                    # u, delta, z in; out
    chunk_states = batch * dim * ((seqlen + 127) // 128) * dstate * 4
    fwd = 3 * rows + bc + chunk_states                          # forward that saves chunk states (no out)
    bwd = 4 * rows + bc + chunk_states + 3 * rows + 2 * batch * dstate * seqlen * 4
    return fwd + bwd


def time_ms(fn, quick):
    from triton.testing import do_bench
    return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def time_once(fn, reps=2):
    return cuda_median_ms(fn, reps, warmup=1)


def copy_bandwidth():
    x = torch.randn(512 * 1024 * 1024 // 4 * 4, device="cuda")     # 2 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), quick=True)
    return 2 * x.numel() * 4 / ms / 1e6


BACKWARD_VARIANTS = (0, 1)   # csrc/backward.cu lists them


def check(shape, grads):
    """Relative errors against the reference on the same bf16 inputs: out and last state, and with
    grads every gradient for each backward variant (keys d<name>, and d<name>_v<variant>)."""
    fused.POISON_OUTPUTS = True
    x = make(*shape, seed=1, requires_grad=grads)
    out, last = fused.selective_scan_fused(**x, delta_softplus=True, return_last_state=True)
    with torch.no_grad() if not grads else torch.enable_grad():
        ref_in = {k: v.detach().requires_grad_(grads) for k, v in x.items()}
        out_r, last_r = selective_scan_ref(**ref_in, delta_softplus=True, return_last_state=True)
    errs = {"out": rel_err(out, out_r), "last_state": rel_err(last, last_r)}
    if grads:
        dout = torch.randn_like(out_r)
        out_r.backward(dout.to(out.dtype).float())
        default = fused.BACKWARD_VARIANT
        for variant in BACKWARD_VARIANTS:
            fused.BACKWARD_VARIANT = variant
            for v in x.values():
                v.grad = None
            out = fused.selective_scan_fused(**x, delta_softplus=True)
            out.backward(dout.to(out.dtype))
            for k in x:
                e = rel_err(x[k].grad, ref_in[k].grad)
                errs[f"d{k}_v{variant}"] = e
                if variant == default:
                    errs["d" + k] = e
        fused.BACKWARD_VARIANT = default
    fused.POISON_OUTPUTS = False
    return errs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, first shape only")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "selective_scan_bench.json"))
    parser.add_argument("--profile-once", action="store_true",
                        help="run the first shape's forward and forward+backward twice each, untimed (for ncu)")
    args = parser.parse_args()
    assert fused.available(), "the fused kernel did not build"
    if args.profile_once:
        x = make(*SHAPES[0][0], seed=2, requires_grad=True)
        for _ in range(2):
            with torch.no_grad():
                fused.selective_scan_fused(**x, delta_softplus=True)
            fused.selective_scan_fused(**x, delta_softplus=True).float().sum().backward()
        torch.cuda.synchronize()
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows, results = [], []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for i, (shape, (bar_f, bar_fb)) in enumerate(shapes):
        errs = check(shape, grads=(i == 0))
        print(f"{shape}: rel err vs reference " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
        x = make(*shape, seed=2)
        xg = make(*shape, seed=2, requires_grad=True)
        dout = torch.randn(shape[:3], device="cuda").to(torch.bfloat16)
        r = {"shape": shape, "errors": errs, "mamba_ssm_h100": [bar_f, bar_fb]}

        def fwd():
            with torch.no_grad():
                fused.selective_scan_fused(**x, delta_softplus=True)

        def fwd_bwd(det=False):
            out = fused.selective_scan_fused(**xg, delta_softplus=True, deterministic=det)
            torch.autograd.grad(out, list(xg.values()), dout)

        for variant in (0, 1, 2, 3, 4):
            for warps in ((4, 8) if variant < 2 else (4,)):    # variants 2-4 fix 4 warps per block
                fused.FORWARD_VARIANT, fused.FORWARD_WARPS = variant, warps
                r[f"fwd_v{variant}_w{warps}"] = time_ms(fwd, args.quick)
        best = min((k for k in r if k.startswith("fwd_v")), key=lambda k: r[k])
        fused.FORWARD_VARIANT, fused.FORWARD_WARPS = int(best[5]), int(best.split("_w")[1])
        r["fwd_best"] = best
        default_b = fused.BACKWARD_VARIANT
        for variant in BACKWARD_VARIANTS:
            fused.BACKWARD_VARIANT = variant
            r[f"fwdbwd_v{variant}"] = time_ms(fwd_bwd, args.quick)
        best_b = min((k for k in r if k.startswith("fwdbwd_v")), key=lambda k: r[k])
        fused.BACKWARD_VARIANT = int(best_b[8])
        r["fwdbwd_best"] = best_b
        r["fwdbwd_det"] = time_ms(lambda: fwd_bwd(True), args.quick)
        fused.BACKWARD_VARIANT = default_b
        r["fwdbwd_default"] = r[f"fwdbwd_v{default_b}"]
        r["fwd"] = r[best]
        r["fwdbwd"] = r[best_b]
        r["ref_fwd"] = time_once(lambda: selective_scan_ref(**x, delta_softplus=True), reps=1 if i else 3)
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan
            r["mamba_ssm_fwd"] = time_ms(lambda: mamba_scan(**x, delta_softplus=True), args.quick)
        except ImportError:
            r["mamba_ssm_fwd"] = None
        r["fwd_GBs"] = bytes_moved(*shape) / r["fwd"] / 1e6
        r["fwdbwd_GBs"] = bytes_moved(*shape, backward=True) / r["fwdbwd"] / 1e6
        results.append(r)
        print(json.dumps(r), flush=True)
        del x, xg
        torch.cuda.empty_cache()
        b, d, l, n = shape
        theirs = "n/a" if r["mamba_ssm_fwd"] is None else f"{r['mamba_ssm_fwd']:.3f}"
        rows.append(f"| B{b} D{d} L{l} N{n} | {r['ref_fwd']:.1f} | {r['fwd']:.3f} ({best[4:]}) | "
                    f"{r['fwd_GBs']:.0f} | {bar_f:.3f} | {bar_f / r['fwd']:.2f}x | {r['fwdbwd']:.3f} "
                    f"({best_b[7:]}) | {r['fwdbwd_det']:.3f} | {r['fwdbwd_GBs']:.0f} | {bar_fb:.3f} | "
                    f"{bar_fb / r['fwdbwd']:.2f}x | {theirs} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBs": copy_gbs,
                                           "results": results}, indent=1))
    print(f"\nselective scan, bf16, z + D + delta bias + softplus; times in ms; device {torch.cuda.get_device_name()}, "
          f"copy {copy_gbs:.0f} GB/s")
    print("| shape | reference fwd | fused fwd | fwd GB/s | mamba_ssm fwd (H100) | speed-up | fused fwd+bwd "
          "| deterministic fwd+bwd | fwd+bwd GB/s | mamba_ssm fwd+bwd (H100) | speed-up | mamba_ssm here |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nforward+backward ms per backward variant (csrc/backward.cu), with the shape's best forward variant")
    print("| shape | " + " | ".join(f"v{v}" for v in BACKWARD_VARIANTS) + " |")
    for r in results:
        b, d, l, n = r["shape"]
        print(f"| B{b} D{d} L{l} N{n} | " + " | ".join(f"{r[f'fwdbwd_v{v}']:.3f}" for v in BACKWARD_VARIANTS) + " |")


if __name__ == "__main__":
    main()
