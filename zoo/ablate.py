"""Ablation sweeps: train variants of one base model on the same data for the same tokens, then write
a results table and plots.

A sweep file:

    name: attention-ratio
    model: {...}                  # the base model (dict, or a path to configs/models/...)
    trainer: {...}                # the budget every variant and task shares (zoo.config.TrainerConfig)
    tasks:                        # one or more tasks; each may adjust the trainer (steps, lr, ...)
      mqar: {task: {name: mqar, ...}, trainer: {steps: 600}}
    # or a single `task: {...}` (named by its `name`)
    param_match: false            # true: adjust each variant's d_model so its total parameters are
                                  # within param_match_tolerance of the base model's
    param_match_tolerance: 0.02
    jobs: 1                       # variants trained at once (CPU: the number of cores; --jobs overrides)
    seeds: 1                      # model initialisations per variant (an int N -> seeds 0..N-1, or a list);
                                  # a task entry may set its own `seeds`
    variants:
      - {name: mamba2, overrides: {pattern: MMMMMMMM}}
      - {name: 1-in-4, overrides: {layers.attention_ratio: 0.25}, trainer: {lr: 3e-3}}

Variant overrides are dotted model keys (zoo.layout.apply_overrides). A variant's `trainer` may
change the optimisation (lr, warmup, ...) but not steps, batch_size, grad_accum or seed: every
variant of a task sees the same batches in the same order, for the same number of tokens.

With several seeds, each variant trains once per seed (trainer.seed: the model's initialisation; the
batches stay the same) in OUT/<task>/<variant>/seed-<s>/, and its table row gives the metric's mean
over seeds and every seed's value: on tasks like MQAR, learning the lookup is a sudden escape from a
plateau whose timing depends on the initialisation, so one seed can mislead.

Each (task, variant[, seed]) trains in its own process (`python -m zoo.commands.train`), so peak memory is
its own and a crash is contained; its directory OUT/<task>/<variant>/ is a normal training run
(run.yaml, metrics, checkpoints, train.log). A variant is finished when its result.json exists; an
interrupted sweep run again skips finished variants and resumes the unfinished one from its
checkpoint.

Outputs in OUT: results.csv, results.md (one row per task x variant), <task>_loss.png (training
loss of every variant against tokens), <task>_<metric>_vs_attention.png.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import yaml

from zoo.config import ConfigError, load_model_yaml, read_yaml, resolve_model_path, trainer_from_dict

SWEEP_KEYS = ("name", "description", "model", "task", "tasks", "trainer", "variants", "param_match",
              "param_match_tolerance", "param_match_multiple", "jobs", "seeds")
VARIANT_KEYS = ("name", "overrides", "trainer", "description")
FIXED_TRAINER_KEYS = ("steps", "batch_size", "grad_accum", "seed")
RESULT_FILE = "result.json"
RESULT_COLUMNS = ("task", "variant", "layout", "attention_ratio", "d_model", "params_total", "params_active",
                  "tokens", "tokens_per_s", "peak_memory_mb", "final_loss", "eval_loss", "metric_name",
                  "metric", "seeds", "metric_per_seed", "wall_s")
SEQUENCE_MIXERS = ("mamba", "mamba2", "attention", "bimamba", "bidirectional")


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def load_sweep(source: str | dict) -> dict:
    """Read and check a sweep; returns it with `tasks` normalised to {name: {task, trainer}} and the
    base model as a dict."""
    where = source if isinstance(source, str) else "<sweep>"
    sweep = read_yaml(source) if isinstance(source, str) else copy.deepcopy(source)
    for key in sweep:
        if key not in SWEEP_KEYS:
            import difflib
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            raise _err(where, f"{key}: unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; "
                              f"known keys: {', '.join(SWEEP_KEYS)}")
    if "model" not in sweep:
        raise _err(where, "model: missing; give the base model (dict or configs/models/... path)")
    base_dir = os.path.dirname(os.path.abspath(source)) if isinstance(source, str) else os.getcwd()
    if isinstance(sweep["model"], str):
        sweep["model"] = load_model_yaml(resolve_model_path(sweep["model"], base_dir))
    if ("task" in sweep) == ("tasks" in sweep):
        raise _err(where, "give exactly one of `task: {name: ..., ...}` or `tasks: {label: {task: ..., trainer: ...}}`")
    if "task" in sweep:
        task = sweep.pop("task")
        if not isinstance(task, dict) or "name" not in task:
            raise _err(where, "task: must be a task dict with a `name`, e.g. {name: mqar, num_kv_pairs: 16}")
        sweep["tasks"] = {task["name"]: {"task": task}}
    tasks = sweep["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise _err(where, "tasks: must be a mapping label -> {task: {...}, trainer: {...}}")
    base_trainer = dict(sweep.get("trainer") or {})
    for label, spec in tasks.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("task"), dict):
            raise _err(where, f"tasks.{label}: must be {{task: {{name: ..., ...}}, trainer: {{...}}}}")
        extra = set(spec) - {"task", "trainer", "seeds"}
        if extra:
            raise _err(where, f"tasks.{label}.{sorted(extra)[0]}: unknown key; a task entry has task, trainer "
                              f"and seeds")
        trainer_from_dict({**base_trainer, **(spec.get("trainer") or {})}, where=f"{where}: tasks.{label}.")
        if "seed" in (spec.get("trainer") or {}) and "seeds" in spec:
            raise _err(where, f"tasks.{label}: give trainer.seed or seeds, not both")
        spec["seeds"] = _seed_list(spec.get("seeds", sweep.get("seeds")), where,
                                   f"tasks.{label}.seeds" if "seeds" in spec else "seeds")
    jobs = sweep.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise _err(where, f"jobs={jobs!r}: must be an integer >= 1 (variants trained at once)")
    variants = sweep.get("variants")
    if not isinstance(variants, list) or not variants:
        raise _err(where, "variants: must be a non-empty list of {name, overrides}")
    names = set()
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or "name" not in v:
            raise _err(where, f"variants[{i}]: needs a `name` (and `overrides`)")
        for key in v:
            if key not in VARIANT_KEYS:
                raise _err(where, f"variants[{i}].{key}: unknown key; a variant has {', '.join(VARIANT_KEYS)}")
        name = str(v["name"])
        if name in names or not name or "/" in name or name.startswith("."):
            raise _err(where, f"variants[{i}].name={name!r}: names must be unique, non-empty, without '/'")
        names.add(name)
        for key in (v.get("trainer") or {}):
            if key in FIXED_TRAINER_KEYS:
                raise _err(where, f"variants[{i}].trainer.{key}: every variant trains on the same batches "
                                  f"for the same tokens; set {key} in the sweep's trainer instead")
    return sweep


def _seed_list(value, where: str, key: str) -> list[int] | None:
    """`seeds:` as a list of distinct ints (N -> 0..N-1); None when not given (one run, trainer.seed)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise _err(where, f"{key}={value}: must be >= 1 (the number of initialisations per variant)")
        return list(range(value))
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return list(value)
    raise _err(where, f"{key}={value!r}: give a count (seeds: 3 -> seeds 0, 1, 2) or a list of distinct "
                      f"integers >= 0 (seeds: [0, 7])")


def variant_model(sweep: dict, variant: dict) -> dict:
    """The base model with the variant's dotted overrides applied (raw config, not expanded)."""
    from zoo.layout import apply_overrides
    return apply_overrides(sweep["model"], dict(variant.get("overrides") or {}))


def attention_ratio(layout: list[dict]) -> float:
    """Attention layers as a fraction of the sequence-mixer layers (MLP / MoE not counted)."""
    mixers = [e for e in layout if e.get("type") in SEQUENCE_MIXERS]
    return sum(e["type"] == "attention" for e in mixers) / len(mixers) if mixers else 0.0


def count_parameters(model_cfg: dict) -> tuple[int, int]:
    """(total, active) parameters of a model config, built on the meta device (no memory)."""
    import zoo
    model = zoo.build_model(model_cfg, device="meta")
    return model.num_parameters(), model.num_parameters(active=True)


def match_parameters(cfg: dict, target: int, *, tolerance: float = 0.02, multiple: int | None = None,
                     where: str = "") -> tuple[dict, int]:
    """Search d_model for the config whose total parameter count is closest to `target`: multiples of
    `multiple` (default 8), then of its divisors when none lands within `tolerance` (relative).

    Widths that the layers reject (a head count or headdim that must divide them) are skipped. An
    error when even the finest search misses the tolerance.
    """
    from zoo.layout import LayoutError
    first = multiple or 8
    base = int(cfg["d_model"])
    counted: dict[int, int | None] = {}
    best = None
    for step in [m for m in range(first, 0, -1) if first % m == 0]:
        for d in range(step, 4 * base + first + 1, step):
            if d not in counted:
                try:
                    counted[d] = count_parameters({**cfg, "d_model": d})[0]
                except (LayoutError, ValueError):
                    counted[d] = None
            n = counted[d]
            if n is None:
                continue
            if best is None or abs(n - target) < abs(best[1] - target):
                best = (d, n)
            if n > target * 1.5:
                break
        if best is not None and abs(best[1] - target) <= tolerance * target:
            break
    if best is None:
        raise ConfigError(f"{where}param_match: no d_model builds this variant; set param_match_multiple "
                          f"to a width the layers accept (e.g. the head width)")
    d, n = best
    if abs(n - target) > tolerance * target:
        raise ConfigError(f"{where}param_match: the closest d_model={d} gives {n:,} parameters, "
                          f"{(n - target) / target:+.1%} from the base's {target:,} (tolerance "
                          f"{tolerance:.0%}); change the variant's depth or raise param_match_tolerance")
    return {**cfg, "d_model": d}, n


def plan(sweep: dict) -> list[dict]:
    """Every (task, variant) run: its run config and the numbers known before training."""
    from zoo.train import model_config_for_task
    from zoo.tasks import build_task

    base_trainer = dict(sweep.get("trainer") or {})
    runs = []
    for label, spec in sweep["tasks"].items():
        task = build_task(spec["task"])
        base_model = model_config_for_task(sweep["model"], task)
        target = count_parameters(base_model)[0] if sweep.get("param_match") else None
        for variant in sweep["variants"]:
            model = model_config_for_task(variant_model(sweep, variant), task)
            if target is not None:
                model, _ = match_parameters(model, target, tolerance=float(sweep.get("param_match_tolerance", 0.02)),
                                            multiple=sweep.get("param_match_multiple"),
                                            where=f"variant {variant['name']}: ")
            trainer = {**base_trainer, **(spec.get("trainer") or {}), **(variant.get("trainer") or {})}
            for seed in spec.get("seeds") or [None]:
                run_trainer = trainer if seed is None else {**trainer, "seed": seed}
                runs.append({"task": label, "variant": str(variant["name"]), "seed": seed,
                             "run": {"model": model, "task": dict(spec["task"]), "trainer": run_trainer}})
    return runs


def run_subdir(r: dict) -> str:
    """OUT-relative directory of one run: <task>/<variant>, or <task>/<variant>/seed-<s> with seeds."""
    parts = [r["task"], r["variant"]] + ([f"seed-{r['seed']}"] if r.get("seed") is not None else [])
    return os.path.join(*parts)


def _start_variant(run_dir: str, run_cfg: dict, log_path: str, threads: int | None) -> tuple:
    """Start one variant's training process (resuming its own checkpoint); returns (process, log file)."""
    with open(os.path.join(run_dir, "sweep_run.yaml"), "w") as f:
        yaml.safe_dump(run_cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "zoo.commands.train", os.path.join(run_dir, "sweep_run.yaml"),
           "--out", run_dir, "--resume", "--no-progress"]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        # more threads than free cores makes OpenMP spin-waits slow everything down many times over
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(log_path, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _finish_variant(proc, log, run_dir: str, log_path: str) -> dict:
    proc.wait()
    log.close()
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"variant run failed (exit {proc.returncode}); see {log_path}:\n{tail}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _run_variant(run_dir: str, run_cfg: dict, log_path: str, in_process: bool) -> dict:
    """Train one variant to completion (resuming its own checkpoint); returns its summary."""
    if in_process:
        with open(os.path.join(run_dir, "sweep_run.yaml"), "w") as f:
            yaml.safe_dump(run_cfg, f, sort_keys=False)
        from zoo.config import load_run_config
        from zoo.train import Trainer
        with open(log_path, "a") as log:
            trainer = Trainer(load_run_config(run_cfg, ["trainer.progress=false"]), run_dir, resume=True,
                              log=lambda m: (log.write(m + "\n"), log.flush()))
            return trainer.fit()
    proc, fh = _start_variant(run_dir, run_cfg, log_path, None)
    return _finish_variant(proc, fh, run_dir, log_path)


def run_sweep(source: str | dict, out_dir: str, *, in_process: bool = False, jobs: int | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train every (task, variant) not yet finished, then write the tables and plots. Returns rows.

    jobs > 1 trains that many variants at once, each process with cpu_count // jobs threads (on a
    CPU, several single-threaded runs use the cores better than one run's small matrix products).
    """
    sweep = load_sweep(source)
    if jobs is None:                   # the sweep file's choice, else one at a time
        jobs = sweep.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be an integer >= 1 (variants trained at once)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.yaml"), "w") as f:
        yaml.safe_dump(sweep, f, sort_keys=False)
    runs = plan(sweep)
    results: dict[int, dict] = {}
    start = time.perf_counter()
    pending = []
    for i, r in enumerate(runs, 1):
        run_dir = os.path.join(out_dir, run_subdir(r))
        os.makedirs(run_dir, exist_ok=True)
        tag = f"[{i}/{len(runs)}] {run_subdir(r)}"
        result_path = os.path.join(run_dir, RESULT_FILE)
        if os.path.exists(result_path):
            with open(result_path) as f:
                results[i] = json.load(f)
            log(f"{tag}: finished earlier, skipped")
        else:
            pending.append((i, r, run_dir, tag))

    def record(i, r, run_dir, tag, summary, t0):
        row = result_row(r, summary)
        result_path = os.path.join(run_dir, RESULT_FILE)
        with open(result_path + ".tmp", "w") as f:
            json.dump(row, f, indent=2)
        os.replace(result_path + ".tmp", result_path)     # the result file marks the variant done
        results[i] = row
        log(f"{tag}: {row['layout']}  {row['metric_name']} {_fmt(row['metric'])}  loss {_fmt(row['final_loss'])}  "
            f"{_fmt(row['tokens_per_s'], '.0f')} tok/s  ({time.perf_counter() - t0:.0f} s)")

    if in_process or jobs == 1:
        for i, r, run_dir, tag in pending:
            log(f"{tag}: training ({r['run']['model'].get('d_model')} wide) ...")
            t0 = time.perf_counter()
            summary = _run_variant(run_dir, r["run"], os.path.join(run_dir, "train.log"), in_process)
            record(i, r, run_dir, tag, summary, t0)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        running = []
        queue = list(pending)
        while queue or running:
            while queue and len(running) < jobs:
                i, r, run_dir, tag = queue.pop(0)
                log(f"{tag}: training ({r['run']['model'].get('d_model')} wide, {threads} thread(s)) ...")
                log_path = os.path.join(run_dir, "train.log")
                proc, fh = _start_variant(run_dir, r["run"], log_path, threads)
                running.append((proc, fh, i, r, run_dir, tag, log_path, time.perf_counter()))
            time.sleep(0.5)
            for item in [x for x in running if x[0].poll() is not None]:
                running.remove(item)
                proc, fh, i, r, run_dir, tag, log_path, t0 = item
                record(i, r, run_dir, tag, _finish_variant(proc, fh, run_dir, log_path), t0)
    rows = aggregate_seeds([results[i] for i in sorted(results)])
    write_results(rows, out_dir)
    write_plots(rows, out_dir)
    log(f"sweep done in {time.perf_counter() - start:.0f} s: {out_dir}/results.md")
    return rows


def result_row(r: dict, summary: dict) -> dict:
    import zoo
    layout = zoo.load_config(r["run"]["model"])["layout"]
    return {"task": r["task"], "variant": r["variant"], "layout": summary["layout"],
            "attention_ratio": attention_ratio(layout), "d_model": r["run"]["model"]["d_model"],
            "params_total": summary["params_total"], "params_active": summary["params_active"],
            "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
            "peak_memory_mb": summary["peak_memory_mb"], "final_loss": summary["final_loss"],
            "eval_loss": summary["eval_loss"], "metric_name": summary["metric_name"],
            "metric": summary["metric"], "higher_is_better": summary["higher_is_better"],
            "wall_s": summary["wall_s"], "device": summary["device"], "seed": r.get("seed"),
            "run_dir": run_subdir(r)}


def aggregate_seeds(runs: list[dict]) -> list[dict]:
    """One row per (task, variant): with several seeds, metric, losses, speed and wall time are means,
    peak memory the largest, `metric_per_seed` every seed's value and `run_dirs` the seeds' runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    rows = []
    for group in groups.values():
        row = {k: v for k, v in group[0].items() if k not in ("seed", "run_dir")}

        def mean(key):
            vals = [g[key] for g in group if g.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        for key in ("metric", "final_loss", "eval_loss", "tokens_per_s", "wall_s"):
            row[key] = mean(key)
        row["peak_memory_mb"] = max((g["peak_memory_mb"] for g in group if g.get("peak_memory_mb") is not None),
                                    default=None)
        row["seeds"] = len(group)
        row["metric_values"] = [g["metric"] for g in group]
        row["metric_per_seed"] = " ".join(_fmt(v) for v in row["metric_values"])
        row["run_dirs"] = [g.get("run_dir") or os.path.join(g["task"], g["variant"]) for g in group]
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def write_results(rows: list[dict], out_dir: str) -> None:
    """results.csv (every column) and results.md (a table per task)."""
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        metric = trows[0]["metric_name"]
        seeds = max(r.get("seeds", 1) for r in trows)
        mean = " (mean)" if seeds > 1 else ""
        per_seed = f" {metric} per seed |" if seeds > 1 else ""
        lines += [f"## {task}", "",
                  f"| variant | layout | attention | params (active) | tokens/s | peak MB | final loss{mean} | "
                  f"{metric}{mean} |{per_seed}",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if seeds > 1 else "")]
        for r in trows:
            params = f"{r['params_total']:,}" + (f" ({r['params_active']:,})" if r["params_active"] != r["params_total"] else "")
            lines.append(f"| {r['variant']} | `{r['layout']}` | {r['attention_ratio']:.3f} | {params} | "
                         f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['peak_memory_mb'], '.0f')} | "
                         f"{_fmt(r['final_loss'])} | {_fmt(r['metric'])} |"
                         + (f" {r.get('metric_per_seed', '')} |" if seeds > 1 else ""))
        device = trows[0].get("device", "")
        runs = f" x {seeds} seeds (model initialisations; the same batches)" if seeds > 1 else ""
        lines += ["", f"{trows[0]['tokens']:,} training tokens per variant{runs}, device {device}.", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Per task: training loss against tokens for all variants; the metric against attention ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, r in enumerate(trows):
            color = f"C{k % 10}"
            for j, run_dir in enumerate(r.get("run_dirs") or [os.path.join(task, r["variant"])]):
                pts = [(m["tokens"], m["loss"]) for m in _read_metrics(os.path.join(out_dir, run_dir)) if "loss" in m]
                if pts:
                    ax.plot(*zip(*pts), color=color, linewidth=1.2 if j == 0 else 0.8, alpha=1.0 if j == 0 else 0.6,
                            label=f"{r['variant']} ({r['layout']})" if j == 0 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss")
        ax.set_title(f"{task}: training loss")
        ax.legend(fontsize=8)
        written.append(_save(fig, ax, os.path.join(out_dir, f"{task}_loss.png")))

        metric = trows[0]["metric_name"]
        pts = sorted((r["attention_ratio"], r["metric"], r["variant"]) for r in trows if r["metric"] is not None)
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in trows:                  # every seed as a small dot, the mean as the line
            vals = [v for v in r.get("metric_values") or [] if v is not None]
            if len(vals) > 1:
                ax.plot([r["attention_ratio"]] * len(vals), vals, ".", color="gray", alpha=0.7)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("attention layers / sequence-mixer layers")
        ax.set_ylabel(f"eval {metric}" + (" (mean; dots: seeds)" if max(r.get("seeds", 1) for r in trows) > 1 else ""))
        ax.set_title(f"{task}: {metric} against attention ratio")
        written.append(_save(fig, ax, os.path.join(out_dir, f"{task}_{metric}_vs_attention.png")))
    return written


def _save(fig, ax, path: str) -> str:
    """Grid, tight layout, PNG at `path`, figure closed; returns path."""
    import matplotlib.pyplot as plt
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
