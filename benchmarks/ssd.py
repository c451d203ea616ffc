"""SSD chunk scan: correctness at real sizes and speed of the Triton kernels against the reference.

    python benchmarks/ssd.py                 # check + time (CUDA); writes ssd.json to $OUT or .
    python benchmarks/ssd.py --skip-check    # timings only
    python benchmarks/ssd.py --check-only    # correctness only
    python benchmarks/ssd.py --sweep         # also sweep the kernels' launch parameters

Check: bf16 inputs drawn at random, every intermediate and output allocated NaN-filled
(torch.use_deterministic_algorithms + fill_uninitialized_memory), outputs / final states / all
gradients against kernels.ssd.reference in float32 by relative error (bf16: 5e-3 outputs, 1e-2
gradients), for a first call and a repeat (whose launches replay compiled launchers); deterministic
mode run twice must agree bitwise.

Timing: medians of triton.testing.do_bench, bf16, D + dt_bias + softplus, no z (as Mamba2 calls it
with its gated norm), chunk 256, the SSD rows of DESIGN.md section 5 and three small shapes. The
forward is timed under torch.no_grad() (inference: the entering states are kept in bf16), several
separate times (eager timings follow the host when its launches are slower than the GPU: see
kernels/ssd/NOTES.md v3), as a CUDA-graph replay (the GPU's own time), with Triton's own launch
path for comparison, and as CPU ms per call; forward+backward keeps the states fp32. TFLOP/s counts
the matmul work of the chunked algorithm with causal halves counted as half:
fwd = b * nchunks * (nheads * (4 Q P N + Q^2 P) + ngroups * Q^2 N), fwd+bwd = 3 x fwd.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.ssd import fused  # noqa: E402
from kernels.ssd.reference import mamba_chunk_scan_combined_ref  # noqa: E402
from kernels.ssd.triton import chunk_scan, chunk_scan_bwd, chunk_state, launch  # noqa: E402

FAST_LAUNCH = launch.ENABLED

# mamba_ssm 2.3.2 on an H100 80GB (DESIGN.md section 5): forward, forward+backward in ms
MAMBA_SSM_H100 = {
    (8, 2048, 32, 64, 128, 1): (0.531, 3.793),
    (2, 8192, 32, 64, 128, 1): (0.749, 4.426),
    (8, 2048, 64, 64, 64, 8): (0.739, 4.088),
}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, *, dtype=torch.bfloat16, D_per_channel=False,
                with_z=False, with_init=False, n_docs=0, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    args = dict(
        x=rnd(batch, seqlen, nheads, headdim).to(dtype),
        dt=(rnd(batch, seqlen, nheads) - 2.0).to(dtype),       # softplus(. + bias) ~ 0.1 .. 0.5
        A=-torch.exp(rnd(nheads, scale=0.5)),
        B=rnd(batch, seqlen, ngroups, dstate, scale=dstate ** -0.5).to(dtype),
        C=rnd(batch, seqlen, ngroups, dstate, scale=dstate ** -0.5).to(dtype),
        D=rnd(nheads, headdim) if D_per_channel else rnd(nheads),
        dt_bias=rnd(nheads, scale=0.5),
        z=rnd(batch, seqlen, nheads, headdim).to(dtype) if with_z else None,
        initial_states=rnd(batch, nheads, headdim, dstate) if with_init else None,
    )
    seq_idx = None
    if n_docs > 1:
        cuts = torch.sort(torch.randperm(seqlen - 1, generator=g, device=device)[: n_docs - 1] + 1).values
        marks = torch.zeros(seqlen, dtype=torch.int32, device=device)
        marks[cuts] = 1
        seq_idx = torch.cumsum(marks, 0, dtype=torch.int32).expand(batch, seqlen).contiguous()
    return args, seq_idx


GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def run_once(fn, args, seq_idx, chunk_size, dt_limit, go_seed=1, deterministic=None):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in args.items()}
    kw = dict(D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True, dt_limit=dt_limit,
              initial_states=leaves["initial_states"], seq_idx=seq_idx, return_final_states=True)
    if deterministic is not None:
        kw["deterministic"] = deterministic
    out, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size, **kw)
    g = torch.Generator(device=out.device).manual_seed(go_seed)
    gout = torch.randn(out.shape, generator=g, device=out.device)
    gfin = torch.randn(final.shape, generator=g, device=out.device)
    ((out.float() * gout).sum() + (final.float() * gfin).sum()).backward()
    grads = {k: (leaves[k].grad if leaves[k] is not None else None) for k in GRAD_NAMES}
    return out, final, grads


CHECK_CASES = [
    # batch, seqlen, nheads, headdim, dstate, ngroups, chunk, options
    (2, 2048, 8, 64, 128, 1, 256, dict(with_z=True, with_init=True, n_docs=3)),
    (1, 16384, 4, 128, 64, 2, 256, dict(D_per_channel=True)),
    (2, 1000, 16, 64, 64, 8, 128, dict(with_z=True, n_docs=5, dt_limit=(0.01, 0.3))),
    (1, 4096, 8, 128, 128, 4, 256, dict(with_init=True)),
    (3, 333, 6, 64, 128, 3, 64, dict(with_z=True, with_init=True, n_docs=2, D_per_channel=True)),
]


def check(results):
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # every torch.empty -> NaN
    print("== correctness (bf16 vs float32 reference; NaN-poisoned allocations) ==", flush=True)
    all_ok = True
    for batch, seqlen, nheads, headdim, dstate, ngroups, cs, opts in CHECK_CASES:
        opts = dict(opts)
        dt_limit = opts.pop("dt_limit", (0.0, float("inf")))
        args, seq_idx = make_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, **opts)
        o, f, g = run_once(lambda *a, **k: fused.mamba_chunk_scan_combined(*a, **k), args, seq_idx, cs, dt_limit)
        ref_args = {k: (v.float() if v is not None else None) for k, v in args.items()}
        ro, rf, rg = run_once(mamba_chunk_scan_combined_ref, ref_args, seq_idx, cs, dt_limit)
        errs = {"out": rel_err(o, ro), "final": rel_err(f, rf)}
        errs.update({k: rel_err(g[k], rg[k]) for k in GRAD_NAMES if g[k] is not None})
        ok = errs["out"] <= 5e-3 and errs["final"] <= 5e-3 and all(
            v <= 1e-2 for k, v in errs.items() if k not in ("out", "final"))
        # the same call again: every launch now replays the compiled launcher (kernels/ssd/triton/launch.py)
        o2, f2, g2 = run_once(fused.mamba_chunk_scan_combined, args, seq_idx, cs, dt_limit)
        errs["repeat_max"] = max([rel_err(o2, ro), rel_err(f2, rf)] + [rel_err(g2[k], rg[k]) for k in GRAD_NAMES
                                                                       if g2[k] is not None])
        ok = ok and errs["repeat_max"] <= 1e-2
        # deterministic mode: bitwise equal across runs
        _, _, g1 = run_once(fused.mamba_chunk_scan_combined, args, seq_idx, cs, dt_limit, deterministic=True)
        _, _, g2 = run_once(fused.mamba_chunk_scan_combined, args, seq_idx, cs, dt_limit, deterministic=True)
        same = all(torch.equal(g1[k], g2[k]) for k in GRAD_NAMES if g1[k] is not None)
        errs["det_bitwise"] = same
        errs["det_vs_ref_dB"] = rel_err(g1["B"], rg["B"])
        ok = ok and same and errs["det_vs_ref_dB"] <= 1e-2
        all_ok &= ok
        name = f"b{batch} l{seqlen} h{nheads} p{headdim} n{dstate} g{ngroups} cs{cs} {opts} lim{dt_limit}"
        print(("PASS " if ok else "FAIL ") + name + "  " +
              " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()), flush=True)
        results["check"].append(dict(case=name, ok=ok, errs=errs))
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = False
    return all_ok


def flops_fwd(batch, seqlen, nheads, headdim, dstate, ngroups, cs):
    nchunks = -(-seqlen // cs)
    return batch * nchunks * (nheads * (4 * cs * headdim * dstate + cs * cs * headdim) + ngroups * cs * cs * dstate)


def graph_ms(step, warmup=25, rep=100):
    """Median time of `step` captured once in a CUDA graph and replayed: the GPU's own time, without
    the gaps that Python and the launches leave between kernels in eager mode."""
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def bench(fn, args, seq_idx, cs, backward, graph=False, rep=100):
    """Median ms of one forward (under no_grad: inference) or forward + backward (gradients of every
    input through torch.autograd.grad), eager or replayed from a CUDA graph."""
    from triton.testing import do_bench
    leaves = {k: (v.detach().clone().requires_grad_(backward) if v is not None else None) for k, v in args.items()}
    kw = dict(D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True, seq_idx=seq_idx)
    inputs = [v for v in leaves.values() if v is not None]
    gout = torch.randn_like(leaves["x"])

    def step():
        out = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], cs, **kw)
        if backward:
            torch.autograd.grad(out, inputs, gout)
    with torch.set_grad_enabled(backward):
        if graph:
            return graph_ms(step, rep=rep)
        return do_bench(step, warmup=25, rep=rep, return_mode="median")


TIME_SHAPES = [(8, 2048, 32, 64, 128, 1), (2, 8192, 32, 64, 128, 1), (8, 2048, 64, 64, 64, 8)]
# short sequences and small widths: launches and Python dominate there (the issue: "small shapes
# matter"); timed eager and as CUDA-graph replays, for the kernels and the reference alike
SMALL_SHAPES = [(1, 128, 8, 64, 64, 1), (1, 512, 8, 64, 64, 1), (4, 256, 16, 64, 128, 1)]
FWD_REPEATS = 5  # separate do_bench medians of the forward (v2 saw two of one run differ by 2x)


def cpu_ms_per_call(fn, args, cs, n=30):
    """CPU time to enqueue one forward (no_grad), GPU left to drain afterwards: what eager mode costs
    the host, independent of the GPU's time."""
    kw = dict(D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True)
    with torch.no_grad():
        fn(args["x"], args["dt"], args["A"], args["B"], args["C"], cs, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(args["x"], args["dt"], args["A"], args["B"], args["C"], cs, **kw)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3


def _safe(fn):
    """A timing, or nan with the reason printed (a graph capture the reference cannot do, say)."""
    try:
        return fn()
    except Exception as e:  # reported, not fatal: the other numbers still come back
        print(f"  timing failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("nan")


def timings(results, with_reference=True):
    import statistics
    print("== timings (ms, median) ==", flush=True)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_fn
    except ImportError:
        mamba_ssm_fn = None
    ours = fused.mamba_chunk_scan_combined
    det = lambda *a, **k: fused.mamba_chunk_scan_combined(*a, deterministic=True, **k)  # noqa: E731
    for shape in TIME_SHAPES + SMALL_SHAPES:
        small = shape in SMALL_SHAPES
        args, _ = make_inputs(*shape)
        cs = 256
        row = dict(shape=shape, small=small)
        fl = flops_fwd(*shape, cs)
        row["fused_fwd_runs"] = [bench(ours, args, None, cs, False) for _ in range(FWD_REPEATS)]
        row["fused_fwd"] = statistics.median(row["fused_fwd_runs"])
        row["cpu_ms_per_fwd"] = cpu_ms_per_call(ours, args, cs)
        launch.ENABLED = False  # every launch through Triton's JITFunction.run, as before v3
        try:
            row["fused_fwd_jit_launch_runs"] = [bench(ours, args, None, cs, False) for _ in range(3)]
            row["cpu_ms_per_fwd_jit_launch"] = cpu_ms_per_call(ours, args, cs)
        finally:
            launch.ENABLED = FAST_LAUNCH
        row["fused_fwd_graph"] = _safe(lambda: bench(ours, args, None, cs, False, graph=True))
        row["fused_fwdbwd"] = bench(ours, args, None, cs, True)
        if small:
            row["fused_fwdbwd_graph"] = _safe(lambda: bench(ours, args, None, cs, True, graph=True))
        else:
            row["fused_fwdbwd_det"] = bench(det, args, None, cs, True)
        if with_reference:
            row["ref_fwd"] = bench(mamba_chunk_scan_combined_ref, args, None, cs, False)
            row["ref_fwdbwd"] = bench(mamba_chunk_scan_combined_ref, args, None, cs, True)
            if small:
                row["ref_fwd_graph"] = _safe(lambda: bench(mamba_chunk_scan_combined_ref, args, None, cs, False,
                                                           graph=True))
                row["ref_fwdbwd_graph"] = _safe(lambda: bench(mamba_chunk_scan_combined_ref, args, None, cs, True,
                                                              graph=True))
        if mamba_ssm_fn is not None:
            row["mamba_ssm_fwd"] = bench(mamba_ssm_fn, args, None, cs, False)
            row["mamba_ssm_fwdbwd"] = bench(mamba_ssm_fn, args, None, cs, True)
        row["tflops_fwd"] = fl / row["fused_fwd"] / 1e9
        row["tflops_fwdbwd"] = 3 * fl / row["fused_fwdbwd"] / 1e9
        print(row, flush=True)
        results["timings"].append(row)


def print_summary(results):
    nan = float("nan")
    rows = [r for r in results["timings"] if not r.get("small")]
    print(f"{'shape (b, l, h, p, n, g)':26s} {'ref fwd':>7s} {'fwd':>6s} {'(runs min-max)':>14s} {'graph':>6s} "
          f"{'ref f+b':>7s} {'fwd+bwd':>7s} {'det f+b':>7s} {'TF/s fwd':>8s} {'TF/s f+b':>8s} {'bar fwd':>7s} "
          f"{'bar f+b':>7s}")
    for r in rows:
        bar = MAMBA_SSM_H100.get(tuple(r["shape"]), (nan, nan))
        runs = f"{min(r['fused_fwd_runs']):.3f}-{max(r['fused_fwd_runs']):.3f}"
        print(f"{str(tuple(r['shape'])):26s} {r.get('ref_fwd', nan):7.3f} {r['fused_fwd']:6.3f} {runs:>14s} "
              f"{r['fused_fwd_graph']:6.3f} {r.get('ref_fwdbwd', nan):7.3f} {r['fused_fwdbwd']:7.3f} "
              f"{r['fused_fwdbwd_det']:7.3f} {r['tflops_fwd']:8.1f} {r['tflops_fwdbwd']:8.1f} {bar[0]:7.3f} "
              f"{bar[1]:7.3f}")
    print("eager forward, host side (ms): CPU per call and do_bench runs, fast launch vs Triton's launch path:")
    for r in results["timings"]:
        jit = r.get("fused_fwd_jit_launch_runs", [nan])
        print(f"  {str(tuple(r['shape'])):26s} fast: cpu {r.get('cpu_ms_per_fwd', nan):.3f} runs "
              f"{min(r['fused_fwd_runs']):.3f}-{max(r['fused_fwd_runs']):.3f} | jit: cpu "
              f"{r.get('cpu_ms_per_fwd_jit_launch', nan):.3f} runs {min(jit):.3f}-{max(jit):.3f} "
              f"| graph {r.get('fused_fwd_graph', nan):.3f}")
    rows = [r for r in results["timings"] if r.get("small")]
    if rows:
        print("small shapes (ms; eager / CUDA-graph replay):")
        print(f"{'shape (b, l, h, p, n, g)':26s} {'ref fwd':>15s} {'fwd':>15s} {'ref fwd+bwd':>15s} "
              f"{'fwd+bwd':>15s}")
        for r in rows:
            pair = lambda k: f"{r.get(k, nan):.3f} / {r.get(k + '_graph', nan):.3f}"  # noqa: E731
            print(f"{str(tuple(r['shape'])):26s} {pair('ref_fwd'):>15s} {pair('fused_fwd'):>15s} "
                  f"{pair('ref_fwdbwd'):>15s} {pair('fused_fwdbwd'):>15s}")


def stages(results):
    """Per-kernel times of the forward and backward at the first timing shape."""
    from triton.testing import do_bench
    from kernels.ssd.triton.bmm import bmm_chunk
    from kernels.ssd.triton.chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
    from kernels.ssd.triton.state_passing import state_passing_bwd, state_passing_fwd
    args, _ = make_inputs(*TIME_SHAPES[0])
    cs, inf = 256, (0.0, float("inf"))
    x, dt, A, B, C, D, bias = (args[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    t = {}
    b = lambda f: do_bench(f, warmup=10, rep=50, return_mode="median")  # noqa: E731
    t["cumsum_fwd"] = b(lambda: chunk_cumsum_fwd(dt, A, bias, True, inf, cs))
    dt_out, dA_cs = chunk_cumsum_fwd(dt, A, bias, True, inf, cs)
    t["chunk_state"] = b(lambda: chunk_state.chunk_state(x, B, dt_out, dA_cs, None, cs))
    t["chunk_state_fwd(+cumsum)"] = b(lambda: chunk_state.chunk_state_fwd(x, B, dt, A, bias, True, inf, None, cs))
    states = chunk_state.chunk_state(x, B, dt_out, dA_cs, None, cs)
    t["state_passing_fwd"] = b(lambda: state_passing_fwd(states, dA_cs, None, None, cs, x.shape[1], torch.float32))
    t["state_passing_fwd(bf16 out)"] = b(lambda: state_passing_fwd(states, dA_cs, None, None, cs, x.shape[1],
                                                                   torch.bfloat16))
    states_in, final = state_passing_fwd(states, dA_cs, None, None, cs, x.shape[1], torch.float32)
    t["bmm"] = b(lambda: bmm_chunk(C, B, cs))
    CB = bmm_chunk(C, B, cs)
    t["chunk_scan_fwd"] = b(lambda: chunk_scan.chunk_scan_fwd(x, None, C, B, CB, dt_out, dA_cs, states_in, D, None,
                                                              cs))
    t["chunk_scan_fwd(+CB)"] = b(lambda: chunk_scan.chunk_scan_fwd(x, None, C, B, None, dt_out, dA_cs, states_in, D,
                                                                   None, cs))
    dy = torch.randn_like(x)
    t["G(chunk_state)"] = b(lambda: chunk_state.chunk_state(dy, C, dt_out, dA_cs, None, cs, to_end=False))
    G = chunk_state.chunk_state(dy, C, dt_out, dA_cs, None, cs, to_end=False)
    t["state_passing_bwd"] = b(lambda: state_passing_bwd(G, None, final, states_in, dA_cs, None, cs, x.shape[1]))
    dstates, _, _ = state_passing_bwd(G, None, final, states_in, dA_cs, None, cs, x.shape[1])
    t["chunk_scan_bwd(dx+dc)"] = b(lambda: chunk_scan_bwd.chunk_scan_bwd(x, dy, B, C, CB, dt_out, dA_cs, states_in,
                                                                        dstates, D, None, cs, False))
    _, _, _, ddt_part, dda, _ = chunk_scan_bwd.chunk_scan_bwd(x, dy, B, C, CB, dt_out, dA_cs, states_in, dstates, D,
                                                              None, cs, False)
    t["cumsum_bwd"] = b(lambda: chunk_cumsum_bwd(dt, A, bias, True, inf, cs, dt_out, dda, ddt_part))
    print("== stages at", TIME_SHAPES[0], "(ms) ==", flush=True)
    for k, v in t.items():
        print(f"  {k:24s} {v:.4f}", flush=True)
    results["stages"] = t


def sweep(results):
    """Launch parameters of the heaviest kernels at the first timing shape."""
    args, _ = make_inputs(*TIME_SHAPES[0])
    cs = 256
    print("== sweep ==", flush=True)
    base = (dict(chunk_scan.CONFIG), dict(chunk_state.CONFIG), dict(chunk_scan_bwd.CONFIG))
    out = []
    variants = [
        ("default", {}, {}, {}),
        ("scan n64 stages3", dict(block_n=64, num_stages=3), {}, {}),
        ("scan t32", dict(block_t=32), {}, {}),
        ("scan w8", dict(num_warps=8), {}, {}),
        ("state s128 w8", {}, dict(block_s=128, num_warps=8), {}),
        ("state w8", {}, dict(num_warps=8), {}),
        ("bwd minprog 256", {}, {}, dict(min_programs=256)),
        ("bwd minprog 512", {}, {}, dict(min_programs=512)),
        ("bwd block32", {}, {}, dict(block=32)),
        ("bwd warps4", {}, {}, dict(num_warps=4)),
        ("default again", {}, {}, {}),
    ]
    for name, scan_cfg, state_cfg, bwd_cfg in variants:
        chunk_scan.CONFIG.update(scan_cfg)
        chunk_state.CONFIG.update(state_cfg)
        chunk_scan_bwd.CONFIG.update(bwd_cfg)
        try:
            fwd = bench(fused.mamba_chunk_scan_combined, args, None, cs, False)
            fb = bench(fused.mamba_chunk_scan_combined, args, None, cs, True)
            print(f"  {name:22s} fwd {fwd:.4f}  fwd+bwd {fb:.4f}", flush=True)
            out.append((name, fwd, fb))
        except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
            print(f"  {name:22s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        chunk_scan.CONFIG.clear(); chunk_scan.CONFIG.update(base[0])        # noqa: E702
        chunk_state.CONFIG.clear(); chunk_state.CONFIG.update(base[1])      # noqa: E702
        chunk_scan_bwd.CONFIG.clear(); chunk_scan_bwd.CONFIG.update(base[2])  # noqa: E702
    results["sweep"] = out


def extras(results):
    """The fused gated RMSNorm and the decode step: check against their references, then time."""
    from triton.testing import do_bench
    from kernels.norm import gated_rms_norm
    from kernels.norm.reference import gated_rms_norm_ref
    from kernels.ssd.reference import ssd_step_ref
    print("== gated RMSNorm (bf16, rows = 8 x 2048) ==", flush=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    for d, ngroups, nbg in ((4096, 1, False), (4096, 8, False), (2048, 1, True), (1000, 4, False)):
        x = torch.randn(8, 2048, d, generator=g, device="cuda").bfloat16().requires_grad_()
        z = torch.randn(8, 2048, d, generator=g, device="cuda").bfloat16().requires_grad_()
        w = (1 + 0.2 * torch.randn(d, generator=g, device="cuda")).requires_grad_()
        gy = torch.randn(8, 2048, d, generator=g, device="cuda").bfloat16()
        args = (x, z, w, 1e-5, d // ngroups, nbg)
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        y = gated_rms_norm(*args, backend="fused")
        gr = torch.autograd.grad(y, (x, z, w), gy)
        torch.use_deterministic_algorithms(False)
        xf, zf, wf = (t.detach().float().requires_grad_() for t in (x, z, w))
        yr = gated_rms_norm_ref(xf, zf, wf, 1e-5, d // ngroups, nbg)
        grr = torch.autograd.grad(yr, (xf, zf, wf), gy.float())
        errs = [rel_err(y, yr)] + [rel_err(a, b) for a, b in zip(gr, grr)]
        f = do_bench(lambda: gated_rms_norm(*args, backend="fused"), return_mode="median")
        r = do_bench(lambda: gated_rms_norm_ref(*args), return_mode="median")
        fb = do_bench(lambda: torch.autograd.grad(gated_rms_norm(*args, backend="fused"), (x, z, w), gy),
                      return_mode="median")
        rb = do_bench(lambda: torch.autograd.grad(gated_rms_norm_ref(*args), (x, z, w), gy), return_mode="median")
        gbps = 3 * x.numel() * 2 / f / 1e6
        row = dict(d=d, ngroups=ngroups, norm_before_gate=nbg, errs=errs, fused_fwd=f, ref_fwd=r,
                   fused_fwdbwd=fb, ref_fwdbwd=rb, fwd_GBps=gbps)
        ok = errs[0] <= 5e-3 and max(errs[1:]) <= 1e-2
        print(("PASS " if ok else "FAIL ") + str(row), flush=True)
        rows.append(row)
    results["gated_norm"] = rows
    print("== decode step (bf16 in, fp32 state) ==", flush=True)
    rows = []
    for batch, nheads, headdim, dstate, ngroups in ((1, 64, 64, 128, 1), (32, 64, 64, 128, 8), (128, 32, 64, 128, 1)):
        state = torch.randn(batch, nheads, headdim, dstate, generator=g, device="cuda")
        x = torch.randn(batch, nheads, headdim, generator=g, device="cuda").bfloat16()
        z = torch.randn(batch, nheads, headdim, generator=g, device="cuda").bfloat16()
        dt = torch.randn(batch, nheads, generator=g, device="cuda").bfloat16()
        A = -torch.rand(nheads, generator=g, device="cuda")
        B = torch.randn(batch, ngroups, dstate, generator=g, device="cuda").bfloat16()
        C = torch.randn(batch, ngroups, dstate, generator=g, device="cuda").bfloat16()
        D = torch.randn(nheads, generator=g, device="cuda")
        bias = torch.randn(nheads, generator=g, device="cuda")
        kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        s1, s2 = state.clone(), state.clone()
        y1 = fused.ssd_step(s1, x, dt, A, B, C, **kw)
        y2 = ssd_step_ref(s2, x, dt, A, B, C, **kw)
        errs = [rel_err(y1, y2), rel_err(s1, s2)]
        f = do_bench(lambda: fused.ssd_step(s1, x, dt, A, B, C, **kw), return_mode="median")
        r = do_bench(lambda: ssd_step_ref(s2, x, dt, A, B, C, **kw), return_mode="median")
        row = dict(batch=batch, nheads=nheads, headdim=headdim, dstate=dstate, ngroups=ngroups, errs=errs,
                   fused_ms=f, ref_ms=r, state_GBps=2 * state.numel() * 4 / f / 1e6)
        ok = max(errs) <= 5e-3
        print(("PASS " if ok else "FAIL ") + str(row), flush=True)
        rows.append(row)
    results["step"] = rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--check-only", action="store_true", help="correctness only (no ceilings, timings, stages)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip timing the plain-PyTorch reference")
    p.add_argument("--extras", action="store_true", help="also check and time the gated norm and decode step")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/ssd.py needs a CUDA GPU")
        return 1
    import triton
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    results = dict(device=torch.cuda.get_device_name(), check=[], timings=[])
    if a.check_only:
        return 0 if check(results) else 1
    from triton.testing import do_bench
    big = torch.randn(1 << 28, device="cuda")  # 1 GiB: device copy bandwidth (read + write)
    ms = do_bench(lambda: big.clone(), return_mode="median")
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = do_bench(lambda: m @ m, return_mode="median")
    results["ceilings"] = dict(copy_TBps=2 * big.numel() * 4 / ms / 1e9, bf16_matmul_TFLOPs=2 * 8192 ** 3 / mm / 1e9)
    print("ceilings:", results["ceilings"], flush=True)
    del big, m
    t0 = time.time()
    ok = True
    if not a.skip_check:
        ok = check(results)
    timings(results, with_reference=not a.no_reference)
    stages(results)
    if a.extras:
        extras(results)
    if a.sweep:
        sweep(results)
    path = os.path.join(os.environ.get("OUT", "."), "ssd.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\n== summary ({time.time() - t0:.0f} s; correctness {'PASS' if ok else 'FAIL'}) ==")
    print_summary(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
