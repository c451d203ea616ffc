"""Image classification: a .npz of arrays, an image folder, or the bundled handwritten digits.

Sources (`path`):
- None: scikit-learn's bundled handwritten digits (sklearn.datasets.load_digits: 1797 grey 8x8
  images, 10 classes, pixel values 0..16), upsampled bilinearly to image_size (default 32) so that
  patch-16 and patch-4 Vision Mamba embeddings get whole patches. Offline, seconds to train on.
- a .npz with arrays x ([n, h, w], [n, h, w, c] or [n, c, h, w]; the layout is inferred from which
  axis has 1, 3 or 4 entries, or set by channels_last) and y ([n] integer labels from 0).
- a directory with one sub-directory per class (class index = position in sorted order), read with
  Pillow (converted to channels=1 grey or 3 RGB, resized to image_size, default 32).

Images are scaled to [0, 1] (uint8 / 255, digits / 16, floats as given), resized to
image_size x image_size when they differ, then standardised per channel with the training split's
mean and std (normalize=True). No augmentation.

Split: the validation set is val_fraction of every class (stratified), drawn with split_seed, which
is independent of seed so runs with different seeds evaluate on the same images; or val_path (a
second .npz or folder). Training order: one shuffle per epoch drawn from (seed, epoch), so batch
`step` is a pure function of (seed, step, batch_size).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from zoo.tasks import (STREAM_SPLIT, STREAM_TRAIN, Task, check_fraction, check_int, resolved_config,
                       rng)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """x float32 [1797, 1, 8, 8] in [0, 1], y int64 [1797]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def load_npz_arrays(path: str, channels_last: bool | None, key: str) -> tuple[np.ndarray, np.ndarray]:
    """x [n, c, h, w] (dtype as stored), y int64 [n] from a .npz with arrays x and y."""
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"task 'images': {key}={path!r} must hold arrays named x and y, found "
                             f"{sorted(f.keys())}")
        x, y = f["x"], f["y"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if channels_last is None:
            last, first = x.shape[3] in (1, 3, 4), x.shape[1] in (1, 3, 4)
            if last == first:
                raise ValueError(f"task 'images': cannot tell the channel axis of x with shape {x.shape} "
                                 f"in {path!r}; set channels_last: true ([n, h, w, c]) or false ([n, c, h, w])")
            channels_last = last
        if channels_last:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"task 'images': x in {path!r} has shape {x.shape}; give [n, h, w], "
                         f"[n, h, w, c] or [n, c, h, w]")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"task 'images': y in {path!r} must be integer labels of shape [{len(x)}], "
                         f"got {y.dtype} {y.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"task 'images': x in {path!r} has dtype {x.dtype}; give uint8 or float pixels")
    return np.ascontiguousarray(x), y.astype(np.int64)


def load_folder_arrays(path: str, image_size: int, channels: int, key: str,
                       classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """x uint8 [n, channels, image_size, image_size], y int64 [n], class names, from root/<class>/*."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("task 'images': reading an image folder needs Pillow; `pip install pillow`, "
                          "or convert the images to a .npz with arrays x and y") from e
    found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise ValueError(f"task 'images': {key}={path!r} has classes {sorted(set(found) - set(classes))} "
                         f"that the training folder lacks")
    if not classes:
        raise ValueError(f"task 'images': {key}={path!r} has no class sub-directories; lay it out as "
                         f"{path}/<class name>/<image files>")
    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(path, cls)
        if not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                with Image.open(os.path.join(folder, f)) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
                xs.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
                ys.append(label)
    if not xs:
        raise ValueError(f"task 'images': no image files ({', '.join(IMAGE_EXTENSIONS)}) under {key}={path!r}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def stratified_split(y: np.ndarray, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted; round(val_fraction * n_c) of each class c."""
    g = rng(split_seed, STREAM_SPLIT)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        val.append(g.permutation(idx)[: int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(y)), val)
    return train, val


class Images(Task):
    """Image classification.

    Args:
        path: None (bundled digits), a .npz (x, y), or an image folder (one sub-directory per class).
        image_size: side of the square images fed to the model; None: 32 for digits and folders,
            the stored size for a .npz (which must then be square).
        channels: for a folder, 1 (grey) or 3 (RGB, default); otherwise taken from the data.
        channels_last: layout of a 4-D x in a .npz; None infers it.
        val_path: a separate validation .npz or folder; None holds out val_fraction per class.
        val_fraction: held-out share of each class when val_path is None.
        split_seed: the draw of the held-out images (kept apart from seed on purpose).
        normalize: standardise each channel with the training split's mean and std.
        seed: the per-epoch shuffles of the training images.
    Batches: {"inputs": float32 [b, channels, image_size, image_size], "targets": int64 [b]}.
    """

    name = "images"
    kind = "classify"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, path: str | None = None, image_size: int | None = None, channels: int | None = None,
                 channels_last: bool | None = None, val_path: str | None = None, val_fraction: float = 0.2,
                 split_seed: int = 0, normalize: bool = True, seed: int = 0):
        t = self.name
        seed = check_int("seed", t, seed, 0)
        split_seed = check_int("split_seed", t, split_seed, 0)
        val_fraction = check_fraction("val_fraction", t, val_fraction)
        if image_size is not None:
            image_size = check_int("image_size", t, image_size, 1)
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"task 'images': channels={channels!r} must be 1 (grey) or 3 (RGB)")
        if channels_last not in (None, True, False) or not isinstance(normalize, bool):
            raise ValueError("task 'images': channels_last must be true, false or null and normalize "
                             "true or false")
        path = os.path.expanduser(os.fspath(path)) if path is not None else None
        val_path = os.path.expanduser(os.fspath(val_path)) if val_path is not None else None

        self.classes = None
        if path is None:
            if channels not in (None, 1):
                raise ValueError("task 'images': the bundled digits are grey; leave channels unset or 1")
            image_size = image_size or 32
            x, y = load_digits_arrays()
            xv = yv = None
            if val_path is not None:
                raise ValueError("task 'images': val_path needs path (the digits split themselves)")
        elif os.path.isdir(path):
            image_size, channels = image_size or 32, channels or 3
            x, y, self.classes = load_folder_arrays(path, image_size, channels, "path")
            xv, yv = (None, None) if val_path is None else \
                load_folder_arrays(val_path, image_size, channels, "val_path", self.classes)[:2]
        elif os.path.isfile(path):
            x, y = load_npz_arrays(path, channels_last, "path")
            xv, yv = (None, None) if val_path is None else load_npz_arrays(val_path, channels_last, "val_path")
        else:
            raise ValueError(f"task 'images': path={path!r} does not exist; give a .npz, an image folder, "
                             f"or null for the bundled digits")
        if image_size is None:
            if x.shape[2] != x.shape[3]:
                raise ValueError(f"task 'images': images are {x.shape[2]}x{x.shape[3]}; set image_size "
                                 f"to resize them to a square")
            image_size = int(x.shape[2])
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"task 'images': the data has {x.shape[1]} channel(s), channels={channels}")
        if xv is not None and xv.shape[1:] != x.shape[1:]:
            raise ValueError(f"task 'images': val_path images {xv.shape[1:]} differ from path's {x.shape[1:]}")
        channels = int(x.shape[1])
        self.config = resolved_config(self.name, locals())

        if xv is None:
            train_idx, val_idx = stratified_split(y, val_fraction, split_seed)
            if len(val_idx) == 0:
                raise ValueError(f"task 'images': val_fraction={val_fraction} holds out no image of "
                                 f"{len(y)}; raise val_fraction or give val_path")
            xv, yv, x, y = x[val_idx], y[val_idx], x[train_idx], y[train_idx]
        if len(y) == 0:
            raise ValueError("task 'images': the training split is empty; lower val_fraction")
        low, high = int(min(y.min(), yv.min())), int(max(y.max(), yv.max()))
        if low < 0:
            raise ValueError(f"task 'images': labels must be >= 0, found {low}")
        self.num_classes, self.image_size, self.channels = high + 1, image_size, channels
        self.seq_len = self.eval_seq_len = None
        self.seed = seed
        self._scale = 255.0 if x.dtype == np.uint8 else 1.0
        self._x, self._y = torch.from_numpy(x), torch.from_numpy(y)
        self._xv, self._yv = torch.from_numpy(np.ascontiguousarray(xv)), torch.from_numpy(yv)
        self._mean, self._std = self._channel_stats() if normalize else (None, None)
        self._perm_cache: dict[int, np.ndarray] = {}
        self._fingerprint = {"train_images": len(y), "val_images": len(yv), "shape": list(x.shape[1:]),
                             "labels_sha1": hashlib.sha1(y.tobytes() + b"|" + yv.tobytes()).hexdigest()}

    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the scaled training images, [1, c, 1, 1] each, accumulated in
        float64 chunks so a large uint8 set is never converted whole."""
        s = torch.zeros(self.channels, dtype=torch.float64)
        s2 = torch.zeros(self.channels, dtype=torch.float64)
        n = 0
        for i in range(0, len(self._x), 4096):
            chunk = self._x[i:i + 4096].double() / self._scale
            s += chunk.sum((0, 2, 3))
            s2 += (chunk * chunk).sum((0, 2, 3))
            n += chunk.numel() // self.channels
        mean = s / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Stored images [b, c, h, w] -> float32 [b, c, image_size, image_size], scaled, resized,
        standardised."""
        x = x.float() / self._scale
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            down = x.shape[-1] > self.image_size or x.shape[-2] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=down)
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return x.contiguous()

    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = rng(self.seed, STREAM_TRAIN, epoch).permutation(len(self._y))
        return self._perm_cache[epoch]

    def train_batch(self, step: int, batch_size: int) -> dict:
        step = check_int("step", self.name, step, 0)
        batch_size = check_int("batch_size", self.name, batch_size)
        n = len(self._y)
        flat = step * batch_size + np.arange(batch_size, dtype=np.int64)   # position in the stream
        idx = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(flat // n):
            sel = flat // n == epoch
            idx[sel] = self._epoch_permutation(int(epoch))[flat[sel] % n]
        idx = torch.from_numpy(idx)
        return {"inputs": self.preprocess(self._x[idx]), "targets": self._y[idx].clone()}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        batch_size = check_int("batch_size", "eval_batches", batch_size)
        for i in range(0, len(self._yv), batch_size):
            yield {"inputs": self.preprocess(self._xv[i:i + batch_size]),
                   "targets": self._yv[i:i + batch_size].clone()}

    def metric(self, logits: torch.Tensor, batch: dict) -> tuple[float, float]:
        """(images classified right by argmax, images); logits [b, num_classes]."""
        targets = batch["targets"].to(logits.device)
        return float((logits.argmax(-1) == targets).sum()), float(targets.numel())
