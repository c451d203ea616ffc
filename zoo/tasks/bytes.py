"""Byte-level language modelling (vocab 256) over local text files, as MambaByte trains.

The default corpus is the Python standard library's own .py sources, found at run time under
sysconfig.get_paths()["stdlib"] (site-packages and dist-packages excluded): tens of MB of real
text every Python install carries, so nothing is downloaded.

Files are read once into one uint8 array per split (cached in memory per process, keyed by the
file list), each file followed by a NUL byte (0x00) that marks the document boundary. Windows of
seq_len + 1 bytes cross boundaries freely, as in packed LM training.

Train/validation split, deterministic on every machine:
- split="file" (default): a file goes to validation when sha1(its path relative to the root it was
  found under) falls in the lowest val_fraction of the hash range; no file is in both splits.
- split="tail": the last val_fraction of the concatenated bytes (for a single large file).
- val_paths given: those files are the validation set and every file of `paths` trains.

Metric: bits_per_byte = mean cross-entropy (nats) / ln 2 over the validation windows.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import Iterator

import numpy as np
import torch

from zoo.tasks import LN2, Task, check_fraction, check_int, resolved_config, token_cross_entropy
from zoo.tasks.windows import Windows

DOC_SEPARATOR = 0
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_CORPUS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, dict]] = {}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def find_files(paths: list[str], extensions: list[str] | None, task: str = "bytes",
               key: str = "paths") -> list[tuple[str, str]]:
    """[(file path, split key)] sorted by split key. A directory is walked recursively (hidden
    folders, __pycache__, site-packages and dist-packages skipped) for files ending in one of
    `extensions` (all files when None); a file named directly is always taken. The split key is the
    path relative to the directory it was found under (the file's name for a file given directly),
    so the split does not depend on where the corpus lives."""
    exts = tuple(extensions) if extensions is not None else None
    found: dict[str, str] = {}
    for root in paths:
        root = os.path.expanduser(str(root))
        if os.path.isfile(root):
            found.setdefault(os.path.abspath(root), os.path.basename(root))
        elif os.path.isdir(root):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames
                                     if not d.startswith(".") and d not in _EXCLUDED_DIRS)
                for f in sorted(filenames):
                    full = os.path.join(dirpath, f)
                    if (exts is None or f.endswith(exts)) and os.path.isfile(full):
                        rel = os.path.relpath(full, root).replace(os.sep, "/")
                        found.setdefault(os.path.abspath(full), rel)
        else:
            raise ValueError(f"task {task!r}: {key} entry {root!r} is neither a file nor a directory; "
                             f"give existing text files or folders")
    files = sorted(found.items(), key=lambda item: (item[1], item[0]))
    if not files:
        raise ValueError(f"task {task!r}: no files found under {key}={paths} with extensions="
                         f"{extensions}; check the paths or set extensions (null takes every file)")
    return files


def in_validation(split_key: str, val_fraction: float) -> bool:
    """Deterministic by-file split: the top 64 bits of sha1(split_key) as a fraction of 2^64."""
    h = int.from_bytes(hashlib.sha1(split_key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < val_fraction


def concatenate(files: list[str]) -> np.ndarray:
    """uint8 [total bytes + one separator per file], read straight into one preallocated array."""
    sizes = [os.path.getsize(f) for f in files]
    out = np.empty(sum(sizes) + len(files), dtype=np.uint8)
    pos = 0
    for f, size in zip(files, sizes):
        with open(f, "rb") as fh:
            pos += fh.readinto(memoryview(out[pos:pos + size]))
        out[pos] = DOC_SEPARATOR
        pos += 1
    return out[:pos]


def load_corpus(paths: list[str], extensions: list[str] | None, val_paths: list[str] | None,
                split: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train uint8 [n], validation uint8 [m], info) for a corpus, built once per process."""
    files = find_files(paths, extensions)
    val_files = find_files(val_paths, extensions, key="val_paths") if val_paths is not None else None
    key = (tuple(files), tuple(val_files or ()), split, val_fraction,
           tuple((os.path.getsize(f), os.path.getmtime(f)) for f, _ in files + (val_files or [])))
    if key in _CORPUS_CACHE:
        return _CORPUS_CACHE[key]
    if val_files is not None:
        train_files, val_files_ = files, val_files
    elif split == "file":
        train_files = [(f, k) for f, k in files if not in_validation(k, val_fraction)]
        val_files_ = [(f, k) for f, k in files if in_validation(k, val_fraction)]
        if not train_files or not val_files_:
            raise ValueError(f"task 'bytes': the by-file split of {len(files)} file(s) with val_fraction="
                             f"{val_fraction} leaves the {'validation' if not val_files_ else 'training'} "
                             f"split empty; give more files, change val_fraction, use split: tail, or "
                             f"give val_paths")
    else:
        train_files, val_files_ = files, []
    if split == "tail" and val_files is None:
        everything = concatenate([f for f, _ in files])
        cut = len(everything) - int(round(len(everything) * val_fraction))
        train, val = everything[:cut], everything[cut:]
    else:
        train, val = concatenate([f for f, _ in train_files]), concatenate([f for f, _ in val_files_])
    digest = hashlib.sha1()
    for f, k in train_files + [("", "|")] + val_files_:
        digest.update(f"{k}\0".encode("utf-8"))
    info = {"train_files": [k for _, k in train_files], "val_files": [k for _, k in val_files_],
            "fingerprint": {"train_bytes": int(len(train)), "val_bytes": int(len(val)),
                            "num_files": len(train_files) + len(val_files_),
                            "files_sha1": digest.hexdigest()}}
    _CORPUS_CACHE[key] = (train, val, info)
    return train, val, info


class Bytes(Task):
    """Byte-level LM.

    Args:
        paths: files and/or directories of the corpus (str or list); None: the standard library's
            .py sources.
        extensions: file endings taken from directories, e.g. [".py", ".txt"]; None takes every
            file. Default: [".py"] for the standard library, every file for given paths.
        seq_len: bytes per example (inputs and targets are [b, seq_len]).
        split: "file" (by a hash of each file's path) or "tail" (the last val_fraction of bytes).
        val_fraction: share of files (split=file) or bytes (split=tail) held out for validation.
        val_paths: explicit validation files/directories (then split and val_fraction are unused).
        num_eval: validation windows of seq_len + 1 bytes (fewer if the split is short).
        seed: the stream of training window offsets.
    """

    name = "bytes"
    kind = "lm"
    metric_name = "bits_per_byte"
    higher_is_better = False

    def __init__(self, paths: str | list | None = None, extensions: list | None = None,
                 seq_len: int = 512, split: str = "file", val_fraction: float = 0.05,
                 val_paths: str | list | None = None, num_eval: int = 256, seed: int = 0):
        t = self.name
        seq_len = check_int("seq_len", t, seq_len, 1)
        num_eval = check_int("num_eval", t, num_eval, 1)
        seed = check_int("seed", t, seed, 0)
        val_fraction = check_fraction("val_fraction", t, val_fraction)
        if split not in ("file", "tail"):
            raise ValueError(f"task 'bytes': split={split!r} must be 'file' (held-out files) or 'tail' "
                             f"(the last val_fraction of the bytes)")
        paths = _as_list(paths, "paths")
        val_paths = _as_list(val_paths, "val_paths")
        if extensions is not None:
            extensions = _as_list(extensions, "extensions")
        elif paths is None:
            extensions = [".py"]
        self.config = resolved_config(self.name, locals())
        self.vocab_size, self.seq_len, self.eval_seq_len = 256, seq_len, seq_len
        train, val, self.info = load_corpus(paths if paths is not None else [stdlib_dir()], extensions,
                                            val_paths, split, val_fraction)
        self.windows = Windows(train, val, seq_len, num_eval, seed, t)

    def fingerprint(self) -> dict:
        return dict(self.info["fingerprint"])

    def train_batch(self, step: int, batch_size: int) -> dict:
        return self.windows.train_batch(step, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        return self.windows.eval_batches(batch_size)

    def metric(self, logits: torch.Tensor, batch: dict) -> tuple[float, float]:
        """(summed cross-entropy in bits, bytes scored); logits [b, seq_len, 256]."""
        nats, count = token_cross_entropy(logits, batch["targets"])
        return nats / LN2, count


def _as_list(value, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    raise ValueError(f"task 'bytes': {key}={value!r} must be a path or a non-empty list of paths")
