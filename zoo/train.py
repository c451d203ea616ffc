"""The Trainer: AdamW + warmup/cosine, clipping, accumulation, bf16 autocast, eval, atomic
checkpoints and exact resume; one process, or several under `torchrun` (DDP, or FSDP2).

    from zoo.config import load_run_config
    from zoo.train import Trainer
    summary = Trainer(load_run_config("configs/train/mqar-hybrid.yaml"), "runs/x").fit()

Data: micro-batch `m` of optimizer step `s` on rank `r` of `w` processes is
`task.train_batch((s * grad_accum + m) * w + r, batch_size)`. Tasks make a batch a pure function
of that index, so the step is the whole data position and a resumed run sees the batches a
straight run saw; ranks read disjoint interleaved shards of one stream.

Weight decay (decided): AdamW decays weight matrices (ndim >= 2: projections, embeddings, conv
kernels) and nothing else: no decay on norm weights, biases, and parameters marked
`_no_weight_decay` by their layer (Mamba's A_log, D and dt biases, whose values set time
constants, not feature scales). This is the practice of GPT-2/3 style training (nanoGPT) and of
the Mamba reference training recipes.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from zoo import checkpoint as ckpt
from zoo.config import ConfigError, RunConfig, load_model_yaml

IGNORE_INDEX = -100
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.yaml"


# ---------------------------------------------------------------- small pure pieces

def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over `warmup` steps to `lr`,
    then cosine decay to `lr * min_lr_ratio` at the last step (or constant when cosine is off)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.cosine:
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases and `_no_weight_decay` parameters do not."""
    decay, no_decay = [], []
    seen = set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def task_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32. lm: logits [b, l, V], targets [b, l] (-100 ignored); classify: [b, C], [b]."""
    if kind == "lm":
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def load_pretrained_weights(model: torch.nn.Module, path: str) -> None:
    """Fine-tuning: copy the weights of the checkpoint at `path` (zoo, run directory or Hugging Face)
    into `model`, which must have the same architecture; a mismatch names the first differing tensor."""
    pretrained = ckpt.from_pretrained(path).state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in pretrained]
    extra = [k for k in pretrained if k not in own]
    if missing or extra:
        raise ConfigError(f"trainer.init_from={path!r}: its model differs from model: (missing {missing[:2]}, "
                          f"unexpected {extra[:2]}); leave model: out to fine-tune the checkpoint's own model")
    for key, value in own.items():
        if value.shape != pretrained[key].shape:
            raise ConfigError(f"trainer.init_from={path!r}: {key} has shape {tuple(pretrained[key].shape)} "
                              f"there but {tuple(value.shape)} in model: (vocab_size, d_model, ...?)")
    model.load_state_dict(pretrained)


def model_config_for_task(model_cfg: Any, task) -> dict:
    """The model config dict with what the task decides filled in where the config leaves it unset:
    vocab_size (lm); model kind and image.{num_classes, image_size, in_channels} (classify)."""
    cfg = load_model_yaml(model_cfg) if isinstance(model_cfg, str) else copy.deepcopy(model_cfg)
    if task.kind == "lm":
        if cfg.get("vocab_size") is None:
            cfg["vocab_size"] = task.vocab_size
        elif cfg["vocab_size"] < task.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg['vocab_size']} is smaller than the task's vocab_size="
                              f"{task.vocab_size}: remove model.vocab_size (the task sets it) or raise it")
        return cfg
    cfg.setdefault("model", "image_classifier")
    image = cfg.setdefault("image", {})
    for key, value in (("num_classes", task.num_classes), ("image_size", task.image_size),
                       ("in_channels", task.channels)):
        if value is None:
            continue
        if image.get(key) is None:
            image[key] = value
        elif image[key] != value:
            raise ConfigError(f"model.image.{key}={image[key]} differs from the task's {value}: remove "
                              f"model.image.{key} (the task sets it) or make them agree")
    return cfg


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available: use trainer.device=cpu or auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError("trainer.precision=bf16 needs CUDA (on CPU training runs in fp32): use "
                          "trainer.precision=auto or fp32")
    return torch.bfloat16


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def layout_string(model) -> str:
    """The model's layout as one compact string, from zoo.layout when it offers one."""
    try:
        from zoo import layout as zl
        for fn_name in ("pattern_string", "layout_string", "to_pattern"):
            fn = getattr(zl, fn_name, None)
            if fn is not None:
                return str(fn(model.layout))
    except Exception:                       # the model's own repr of its layout is a fine fallback
        pass
    layout = getattr(model, "layout", None)
    if isinstance(layout, str):
        return layout
    return str(layout)


# ---------------------------------------------------------------- RNG state

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


# ---------------------------------------------------------------- distributed

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)


def _all_reduce_sum(values: list[float], device: torch.device, dist_info: Dist) -> list[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Train `run.model` on `run.task` with `run.trainer`, writing everything under `out_dir`.

    out_dir/run.yaml          the resolved run config (model as its full expanded config)
    out_dir/metrics.csv|jsonl one row per log step and per evaluation
    out_dir/checkpoints/      atomic training checkpoints (zoo.checkpoint)
    out_dir/summary.json      final numbers (written by fit)
    """

    def __init__(self, run: RunConfig, out_dir: str, *, resume: bool = False,
                 log: Callable[[str], None] | None = None):
        from zoo.models import build_model
        from zoo.tasks import build_task

        self.run, self.cfg, self.out_dir = run, run.trainer, out_dir
        self.dist = init_distributed(self.cfg.device)
        self.device = resolve_device(self.cfg.device, self.dist.local_rank)
        self.amp_dtype = resolve_precision(self.cfg.precision, self.device)
        self._log = log or (lambda msg: print(msg, flush=True))

        existing = ckpt.latest_checkpoint(out_dir)
        if existing and not resume:
            raise ConfigError(f"{out_dir} already holds checkpoints ({os.path.basename(existing)}): pass "
                              f"--resume to continue that run, or choose another --out")

        torch.manual_seed(self.cfg.seed)           # same init on every rank
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.task = build_task(run.task)
        self.model_config = model_config_for_task(run.model, self.task)
        self.model = build_model(self.model_config)
        if self.cfg.init_from:
            load_pretrained_weights(self.model, self.cfg.init_from)
        self.model = self.model.to(self.device)
        # dropout differs per rank; re-seeded after init so the init stays common
        torch.manual_seed(self.cfg.seed + 1 + self.dist.rank)
        self.raw_model = self.model
        self.train_model = self._wrap(self.model)

        self.optimizer = torch.optim.AdamW(
            param_groups(self.raw_model, self.cfg.weight_decay), lr=self.cfg.lr,
            betas=tuple(self.cfg.betas), eps=self.cfg.eps,
            **({"fused": True} if self.device.type == "cuda" else {}))
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict[str, float] = {}
        self._writer = None
        self._csv_cols: list[str] | None = None
        if self.dist.is_main:
            os.makedirs(out_dir, exist_ok=True)
        if resume and existing:
            self._load(existing)
        elif self.dist.is_main:
            self._truncate_metrics(0)        # rows of a run killed before its first checkpoint
            if resume:
                self._log(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")

    # ------------------------------------------------------------ setup helpers

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist.enabled:
            if self.cfg.parallel == "fsdp":
                from torch.distributed.fsdp import fully_shard
                for module in list(model.modules()):
                    if isinstance(module, torch.nn.ModuleList):
                        for block in module:
                            fully_shard(block)
                fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP
                model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _full_state(self) -> tuple[dict, dict]:
        """Model and optimizer state dicts keyed by parameter name, gathered in full (FSDP) on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(self.raw_model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        state = ckpt.load_training_checkpoint(path)
        ts = state["training_state"]
        if state["config"] != self.raw_model.config:
            raise ConfigError(f"--resume: the model config of {path} differs from this run's model; "
                              f"resume with the run config the checkpoint was made with ({path}/{ckpt.RUN_FILE})")
        self.task.load_state_dict(ts["task"])
        fused = self.optimizer.param_groups[0].get("fused")
        set_state_dict(self.raw_model, self.optimizer, model_state_dict=state["model_state"],
                       optim_state_dict=ts["optimizer"], options=StateDictOptions(full_state_dict=True))
        for group in self.optimizer.param_groups:      # a CUDA checkpoint resumed on CPU, or back
            group["fused"] = fused
        self.step = int(ts["step"])
        self.tokens_seen = int(ts.get("tokens_seen", 0))
        rngs = ts["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            torch.manual_seed(self.cfg.seed + 1 + self.dist.rank + self.step)
        if self.dist.is_main:
            self._truncate_metrics(self.step)
            self._log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ metrics files

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows a killed run wrote after its last checkpoint, so the files match the steps."""
        path = os.path.join(self.out_dir, METRICS_JSONL)
        if not os.path.exists(path):
            return
        rows = [r for r in self._read_rows() if r["step"] <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self._rewrite_csv(rows)

    def _csv_columns(self, rows: list[dict] = ()) -> list[str]:
        """Fixed training columns, then the evaluation columns in the order they first appear."""
        cols = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "examples_per_s",
                "elapsed_s", "eval_loss", f"eval_{self.task.metric_name}"]
        for row in rows:
            cols += [k for k in row if k not in cols]
        return cols

    def _read_rows(self) -> list[dict]:
        path = os.path.join(self.out_dir, METRICS_JSONL)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _rewrite_csv(self, rows: list[dict]) -> None:
        cols = self._csv_columns(rows)
        with open(os.path.join(self.out_dir, METRICS_CSV), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def _write_row(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        row = {k: v for k, v in row.items() if v is not None}
        with open(os.path.join(self.out_dir, METRICS_JSONL), "a") as f:
            f.write(json.dumps(row) + "\n")
        csv_path = os.path.join(self.out_dir, METRICS_CSV)
        if self._csv_cols is None or any(k not in self._csv_cols for k in row):
            rows = self._read_rows()      # a new column (first evaluation): rewrite with the wider header
            self._csv_cols = self._csv_columns(rows)
            self._rewrite_csv(rows)
            return
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv_cols, extrasaction="ignore").writerow(row)
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, row["step"])

    def _open_tensorboard(self) -> None:
        if not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:                   # tensorboard is optional
            return
        self._writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    # ------------------------------------------------------------ the loop

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _batch(self, index: int) -> dict:
        batch = self.task.train_batch(index, self.cfg.batch_size)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _sync_context(self, last_micro: bool):
        """Gradient all-reduce only on the last micro-batch of an accumulated step."""
        import contextlib
        model = self.train_model
        model = getattr(model, "_orig_mod", model)
        if last_micro or not self.dist.enabled:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        if hasattr(self.raw_model, "set_requires_gradient_sync"):          # FSDP2
            self.raw_model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step (grad_accum micro-batches); returns detached loss / aux / grad norm."""
        cfg, step = self.cfg, self.step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        examples = tokens = 0
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            if last and self.dist.enabled and hasattr(self.raw_model, "set_requires_gradient_sync"):
                self.raw_model.set_requires_gradient_sync(True)
            batch = self._batch((step * cfg.grad_accum + micro) * self.dist.world_size + self.dist.rank)
            with self._sync_context(last):
                with self._autocast():
                    out = self.train_model(batch["inputs"])
                loss = task_loss(self.task.kind, out.logits, batch["targets"])
                aux = out.aux_loss if torch.is_tensor(getattr(out, "aux_loss", None)) else torch.zeros((), device=self.device)
                ((loss + aux.float()) / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += aux.detach().float()
            examples += batch["inputs"].shape[0]
            tokens += batch["inputs"].numel() if self.task.kind == "lm" else 0
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        world = self.dist.world_size
        self.tokens_seen += tokens * world
        return {"loss": loss_sum / cfg.grad_accum, "aux_loss": aux_sum / cfg.grad_accum,
                "grad_norm": grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm),
                "lr": lr, "examples": examples * world, "tokens": tokens * world}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and the task's metrics over `eval_batches` validation batches (shared among ranks)."""
        model = self.raw_model
        model.eval()
        sums: dict[str, list[float]] = {}
        loss_sum = loss_count = 0.0
        shard = self.dist.enabled and self.cfg.parallel != "fsdp"   # FSDP: every rank must run every forward
        for i, batch in enumerate(self.task.eval_batches(self.cfg.batch_size)):
            if i >= self.cfg.eval_batches:
                break
            if shard and i % self.dist.world_size != self.dist.rank:
                continue
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self._autocast():
                logits = model(batch["inputs"]).logits
            targets = batch["targets"]
            loss_sum += float(task_loss(self.task.kind, logits, targets, reduction="sum"))
            loss_count += float((targets != IGNORE_INDEX).sum()) if self.task.kind == "lm" else targets.numel()
            for name, (s, n) in self.task.metrics(logits.float(), batch).items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += n
        names = list(sums)
        flat = [loss_sum, loss_count] + [x for n in names for x in sums[n]]
        if not shard and self.dist.enabled:
            flat = [x * self.dist.world_size for x in flat]   # identical on every rank: no reduce
        else:
            flat = _all_reduce_sum(flat, self.device, self.dist)
        result = {"eval_loss": flat[0] / max(flat[1], 1.0)}
        for j, name in enumerate(names):
            s, n = flat[2 + 2 * j], flat[3 + 2 * j]
            result[f"eval_{name}"] = s / n if n else float("nan")
            for dname, dv in self.task.derived_metrics(result[f"eval_{name}"]).items():
                result[f"eval_{dname}"] = dv
        self.train_model.train()
        return result

    def save_checkpoint(self) -> str | None:
        """Write a training checkpoint for the current step (rank 0 writes; all ranks take part)."""
        model_state, optim_state = self._full_state()
        rngs = [rng_state()]
        if self.dist.enabled:
            import torch.distributed as dist
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        path = None
        if self.dist.is_main:
            training_state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": optim_state,
                              "scheduler": {"kind": "warmup_cosine" if self.cfg.cosine else "warmup_constant",
                                            "step": self.step},
                              "rng": rngs, "task": self.task.state_dict(), "world_size": self.dist.world_size}
            path = ckpt.save_training_checkpoint(
                self.out_dir, self.step, model_config=self.raw_model.config, model_state=model_state,
                training_state=training_state, run_config=self.resolved_run_config(),
                keep=self.cfg.keep_checkpoints)
        if self.dist.enabled:
            import torch.distributed as dist
            dist.barrier()
        return path

    def resolved_run_config(self) -> dict:
        d = self.run.to_dict()
        d["model"] = self.raw_model.config
        return d

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `trainer.steps`, evaluating and checkpointing on schedule; returns the summary.

        until: stop after this step instead (the schedule still spans `trainer.steps`); a later
        `--resume` continues exactly as if the run had not stopped.
        """
        import yaml
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.dist.is_main:
            with open(os.path.join(self.out_dir, RUN_FILE), "w") as f:
                yaml.safe_dump(self.resolved_run_config(), f, sort_keys=False)
            self._open_tensorboard()
            n_total = self.raw_model.num_parameters()
            n_active = self.raw_model.num_parameters(active=True)
            self._log(f"model {n_total / 1e6:.3f}M parameters ({n_active / 1e6:.3f}M active), "
                      f"task {self.task.name}, {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum * self.dist.world_size} "
                      f"examples, device {self.device}{', ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else ''}"
                      f"{f', {self.dist.world_size} processes ({cfg.parallel})' if self.dist.enabled else ''}")
        bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True, desc="train",
                   disable=not (self.dist.is_main and cfg.progress), file=sys.stderr)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        window = {"tokens": 0, "examples": 0}
        pending: list[dict] = []
        t_window = time.perf_counter()
        windows: list[tuple[float, int, int]] = []     # (seconds, tokens, examples) per log window
        last_loss = float("nan")
        t_start = time.perf_counter()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        while self.step < stop:
            out = self.train_step()
            pending.append(out)
            window["tokens"] += out["tokens"]
            window["examples"] += out["examples"]
            bar.update(1)
            at_end = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or self.step == stop:
                # one host sync per log step: losses stay on the device in between
                losses = torch.stack([p["loss"] for p in pending]).tolist()
                auxes = torch.stack([p["aux_loss"] for p in pending]).tolist()
                gnorm = float(pending[-1]["grad_norm"])
                elapsed = time.perf_counter() - t_window
                mean_loss = sum(losses) / len(losses)
                last_loss = mean_loss
                if not math.isfinite(mean_loss):
                    bar.close()
                    raise FloatingPointError(f"loss is {mean_loss} at step {self.step}: lower trainer.lr "
                                             f"or raise trainer.warmup")
                row = {"step": self.step, "tokens": self.tokens_seen, "loss": mean_loss,
                       "aux_loss": sum(auxes) / len(auxes), "lr": pending[-1]["lr"], "grad_norm": gnorm,
                       "tokens_per_s": window["tokens"] / elapsed if self.task.kind == "lm" else None,
                       "examples_per_s": window["examples"] / elapsed, "elapsed_s": time.perf_counter() - t_start}
                windows.append((elapsed, window["tokens"], window["examples"]))
                self._write_row(row)
                speed = (f"{row['tokens_per_s']:.0f} tok/s" if row["tokens_per_s"] is not None
                         else f"{row['examples_per_s']:.0f} ex/s")
                bar.set_postfix_str(f"loss {mean_loss:.4f} {speed}")
                if bar.disable and self.dist.is_main:
                    self._log(f"step {self.step}/{cfg.steps} loss {mean_loss:.4f} lr {row['lr']:.2e} "
                              f"grad_norm {gnorm:.3f} {speed}")
                pending.clear()
                window = {"tokens": 0, "examples": 0}
                t_window = time.perf_counter()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end:
                self.last_eval = self.evaluate()
                self._write_row({"step": self.step, "tokens": self.tokens_seen, **self.last_eval})
                if self.dist.is_main:
                    text = " ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items())
                    (bar.write if not bar.disable else self._log)(f"step {self.step}: {text}")
                t_window = time.perf_counter()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or at_end:
                self.save_checkpoint()
                t_window = time.perf_counter()
        bar.close()
        if not self.last_eval and self.step == cfg.steps:     # resumed a finished run
            self.last_eval = self.evaluate()
        # the first window holds allocator / compilation warm-up: keep it out of the speed when
        # there are others
        timed = windows[1:] if len(windows) > 1 else windows
        train_time = sum(w[0] for w in timed)
        summary = self.summary(last_loss, train_time, sum(w[1] for w in timed), sum(w[2] for w in timed),
                               time.perf_counter() - t_start)
        if self.dist.is_main:
            with open(os.path.join(self.out_dir, SUMMARY_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            if self._writer is not None:
                self._writer.close()
        return summary

    def summary(self, last_loss, train_time, train_tokens, train_examples, wall) -> dict[str, Any]:
        m = self.task.metric_name
        return {
            "steps": self.step, "tokens": self.tokens_seen,
            "final_loss": last_loss, "eval_loss": self.last_eval.get("eval_loss"),
            "metric_name": m, "metric": self.last_eval.get(f"eval_{m}"),
            "higher_is_better": self.task.higher_is_better,
            "eval": self.last_eval,
            "tokens_per_s": train_tokens / train_time if train_time > 0 and train_tokens else None,
            "examples_per_s": train_examples / train_time if train_time > 0 else None,
            "peak_memory_mb": peak_memory_mb(self.device),
            "params_total": self.raw_model.num_parameters(),
            "params_active": self.raw_model.num_parameters(active=True),
            "layout": layout_string(self.raw_model),
            "device": str(self.device), "world_size": self.dist.world_size, "wall_s": wall,
        }

    def close(self) -> None:
        if self.dist.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()
