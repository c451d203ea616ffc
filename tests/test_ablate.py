"""Ablation sweeps: output files and columns, same data for every variant, resuming, parameter matching."""
import csv
import json
import os

import pytest

from zoo.ablate import (RESULT_COLUMNS, attention_ratio, count_parameters, load_sweep, match_parameters,
                        run_sweep)
from zoo.config import ConfigError


def tiny_sweep(**extra) -> dict:
    return {
        "name": "tiny",
        "model": {"d_model": 16, "pattern": "M*", "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
                  "attention": {"n_heads": 2}},
        "task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_eval": 8},
        "trainer": {"steps": 3, "batch_size": 4, "log_every": 1, "warmup": 1, "eval_batches": 1},
        "variants": [{"name": "hybrid"}, {"name": "mamba2", "overrides": {"pattern": "MM"}}],
        **extra,
    }


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_writes_table_plots_and_per_variant_runs(tmp_path):
    out = str(tmp_path / "sweep")
    run_sweep(tiny_sweep(), out, jobs=2, log=lambda m: None)   # each variant in its own process, 2 at once
    rows = read_csv(os.path.join(out, "results.csv"))
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert [(r["variant"], r["layout"]) for r in rows] == [("hybrid", "M*"), ("mamba2", "MM")]
    assert [float(r["attention_ratio"]) for r in rows] == [0.5, 0.0]
    for r in rows:
        assert int(r["tokens"]) == 3 * 4 * 16                   # same budget for every variant
        assert float(r["peak_memory_mb"]) > 0 and float(r["tokens_per_s"]) > 0
        assert 0.0 <= float(r["metric"]) <= 1.0 and r["metric_name"] == "accuracy"
        assert int(r["params_total"]) == count_parameters({**tiny_sweep()["model"], "vocab_size": 32,
                                                           "pattern": r["layout"]})[0]
        assert os.path.exists(os.path.join(out, "mqar", r["variant"], "checkpoints", "latest"))
    md = open(os.path.join(out, "results.md")).read()
    assert "| hybrid | `M*` |" in md and "| mamba2 | `MM` |" in md
    for name in ("mqar_loss.png", "mqar_accuracy_vs_attention.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_variants_see_the_same_batches(tmp_path):
    """The data stream depends on the task and seed only: a variant's first batch equals the base's."""
    from zoo.ablate import plan
    from zoo.tasks import build_task
    runs = plan(load_sweep(tiny_sweep()))
    batches = [build_task(r["run"]["task"]).train_batch(0, 4) for r in runs]
    assert all((b["inputs"] == batches[0]["inputs"]).all() for b in batches)
    assert len({json.dumps({k: v for k, v in r["run"]["trainer"].items()}, sort_keys=True) for r in runs}) == 1


def test_interrupted_sweep_skips_finished_variants(tmp_path):
    out = str(tmp_path / "sweep")
    run_sweep(tiny_sweep(), out, in_process=True, log=lambda m: None)
    finished = os.path.join(out, "mqar", "hybrid", "metrics.jsonl")
    before = open(finished).read()
    os.remove(os.path.join(out, "mqar", "mamba2", "result.json"))     # as if killed before it finished
    os.remove(os.path.join(out, "results.csv"))
    messages = []
    run_sweep(tiny_sweep(), out, in_process=True, log=messages.append)
    assert any("hybrid: finished earlier, skipped" in m for m in messages)
    assert not any("mamba2: finished earlier" in m for m in messages)
    assert open(finished).read() == before
    assert len(read_csv(os.path.join(out, "results.csv"))) == 2


def test_seeds_train_each_variant_per_initialisation_and_report_the_mean(tmp_path):
    out = str(tmp_path / "sweep")
    run_sweep(tiny_sweep(seeds=2), out, in_process=True, log=lambda m: None)
    rows = read_csv(os.path.join(out, "results.csv"))
    assert [r["variant"] for r in rows] == ["hybrid", "mamba2"]          # one row per variant
    for r in rows:
        per_seed = []
        for seed in (0, 1):
            run_dir = os.path.join(out, "mqar", r["variant"], f"seed-{seed}")
            with open(os.path.join(run_dir, "result.json")) as f:
                per_seed.append(json.load(f)["metric"])
            with open(os.path.join(run_dir, "sweep_run.yaml")) as f:
                assert f"seed: {seed}" in f.read()
        assert int(r["seeds"]) == 2
        assert float(r["metric"]) == pytest.approx(sum(per_seed) / 2, abs=1e-4)
        assert r["metric_per_seed"] == " ".join(f"{m:.4f}" for m in per_seed)
    import torch
    from safetensors.torch import load_file
    from zoo.checkpoint import latest_checkpoint
    final = [load_file(os.path.join(latest_checkpoint(os.path.join(out, "mqar", "hybrid", f"seed-{s}")),
                                    "model.safetensors")) for s in (0, 1)]
    assert not torch.equal(final[0]["embedding.weight"], final[1]["embedding.weight"])  # same batches, other inits
    md = open(os.path.join(out, "results.md")).read()
    assert "accuracy per seed" in md and "x 2 seeds" in md


@pytest.mark.parametrize("seeds", [0, [1, 1], "3", [-1]])
def test_bad_seeds_name_the_key(seeds):
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep(tiny_sweep(seeds=seeds))


def test_param_match_picks_the_closest_width_within_two_percent():
    base = {"d_model": 128, "vocab_size": 64, "pattern": "M*M*", "mamba2": {"d_state": 16, "headdim": 16},
            "attention": {"n_heads": 4}}
    target = count_parameters(base)[0]
    cfg, n = match_parameters({**base, "pattern": "MMM*"}, target)
    assert abs(n - target) <= 0.02 * target and n == count_parameters(cfg)[0]
    # no other buildable multiple of 8 is closer (brute force over the widths the layers accept)
    others = []
    for d in range(8, 513, 8):
        try:
            others.append(abs(count_parameters({**base, "pattern": "MMM*", "d_model": d})[0] - target))
        except ValueError:
            pass
    assert abs(n - target) == min(others)


def test_param_match_reports_an_unreachable_tolerance():
    base = {"d_model": 16, "vocab_size": 32, "pattern": "M*", "mamba2": {"d_state": 8, "headdim": 8},
            "attention": {"n_heads": 2}}
    with pytest.raises(ConfigError, match="param_match"):
        match_parameters({**base, "pattern": "MM"}, count_parameters(base)[0], tolerance=0.001)


def test_attention_ratio_counts_sequence_mixers_only():
    layout = [{"type": t} for t in ("mamba2", "mlp", "attention", "mlp", "mamba2", "moe", "mamba2", "mlp")]
    assert attention_ratio(layout) == 0.25


@pytest.mark.parametrize("change, needle", [
    ({"variantz": []}, "variantz"),
    ({"variants": [{"name": "a", "trainer": {"steps": 5}}]}, "trainer.steps"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"variants": [{"name": "a", "override": {}}]}, "override"),
    ({"tasks": {"m": {"task": {"name": "mqar"}}}}, "exactly one"),
    ({"jobs": 0}, "jobs"),
])
def test_sweep_errors_name_the_key(change, needle):
    with pytest.raises(ConfigError, match=needle):
        load_sweep(tiny_sweep(**change))


def test_the_default_sweep_plans_the_documented_runs():
    """The README's main command: five layouts from Megatron's allocator, MQAR with 2 seeds, bytes once."""
    import zoo
    from zoo.ablate import plan
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = plan(load_sweep(os.path.join(root, "configs", "ablations", "attention-ratio.yaml")))
    layouts = {r["variant"]: "".join("*" if e["type"] == "attention" else "M"
                                     for e in zoo.load_config(r["run"]["model"])["layout"]) for r in runs}
    assert layouts == {"mamba2": "MMMMMMMM", "1-in-8": "MMMM*MMM", "1-in-4": "MM*MM*MM",
                       "1-in-2": "M*M**M*M", "attention": "********"}
    assert [(r["task"], r["seed"]) for r in runs if r["variant"] == "1-in-4"] == [("mqar", 0), ("mqar", 1),
                                                                                ("bytes", None)]
    gpu = plan(load_sweep(os.path.join(root, "configs", "ablations", "attention-ratio-gpu.yaml")))
    assert len(gpu) == 15 and {r["run"]["trainer"]["steps"] for r in gpu} == {3000}
