"""zoo.tasks: every generator against its definition (naive loops), determinism and resumption,
splits, metric arithmetic, file formats."""
from __future__ import annotations

import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from zoo.tasks import IGNORE_INDEX, build_task, task_arguments
from zoo.tasks.mqar import distinct_choices, power_law_slots

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------- fixtures

def write_text_corpus(root, n_files=40, seed=0):
    """n_files small text files in nested folders, each with content unique to it."""
    g = np.random.default_rng(seed)
    for i in range(n_files):
        sub = os.path.join(root, f"pkg{i % 3}", "sub" if i % 2 else "")
        os.makedirs(sub, exist_ok=True)
        words = " ".join(f"w{int(v)}" for v in g.integers(0, 1000, size=int(g.integers(20, 200))))
        with open(os.path.join(sub, f"mod_{i}.py"), "w") as f:
            f.write(f"# file {i}\n{words}\n")
    with open(os.path.join(root, "notes.md"), "w") as f:     # not .py: skipped when extensions=[".py"]
        f.write("not python\n" * 50)
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_text_corpus(str(tmp_path / "corpus"))


@pytest.fixture
def token_file(tmp_path):
    ids = (np.arange(5000) * 7 % 1000).astype(np.uint16)
    path = tmp_path / "ids.bin"
    ids.tofile(path)
    return str(path), ids


def small_configs(tmp_dir):
    corpus_dir = write_text_corpus(os.path.join(tmp_dir, "c"))
    ids = np.random.default_rng(0).integers(0, 500, size=4000).astype(np.uint16)
    ids.tofile(os.path.join(tmp_dir, "ids.bin"))
    g = np.random.default_rng(1)
    np.savez(os.path.join(tmp_dir, "img.npz"), x=g.integers(0, 256, size=(60, 6, 6, 3), dtype=np.uint8),
             y=np.arange(60) % 4)
    return {
        "mqar": {"name": "mqar", "vocab_size": 64, "seq_len": 48, "num_kv_pairs": 6, "num_eval": 20},
        "selective_copying": {"name": "selective_copying", "vocab_size": 10, "seq_len": 40,
                              "num_tokens": 6, "num_eval": 20},
        "induction_heads": {"name": "induction_heads", "vocab_size": 8, "seq_len": 32,
                            "eval_seq_len": 64, "num_eval": 20},
        "bytes": {"name": "bytes", "paths": corpus_dir, "seq_len": 32, "val_fraction": 0.3, "num_eval": 10},
        "tokens": {"name": "tokens", "path": os.path.join(tmp_dir, "ids.bin"), "vocab_size": 500,
                   "seq_len": 16, "val_fraction": 0.1, "num_eval": 10},
        "images": {"name": "images", "path": os.path.join(tmp_dir, "img.npz"), "image_size": 8},
    }


ALL_TASKS = ["mqar", "selective_copying", "induction_heads", "bytes", "tokens", "images"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return small_configs(str(tmp_path_factory.mktemp("tasks")))


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- MQAR

def mqar_batch(**kw):
    cfg = {"name": "mqar", "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 8, "seed": 3, **kw}
    task = build_task(cfg)
    return task, task.train_batch(step=5, batch_size=32)


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_every_target_is_the_value_paired_with_its_key_in_the_context(random_non_queries):
    task, b = mqar_batch(random_non_queries=random_non_queries)
    V, K = task.vocab_size, task.num_kv_pairs
    for x, y in zip(b["inputs"].tolist(), b["targets"].tolist()):
        context_keys, context_values = x[0:2 * K:2], x[1:2 * K:2]
        assert len(set(context_keys)) == K and all(1 <= k < V // 2 for k in context_keys)
        assert len(set(context_values)) == K and all(V // 2 <= v < V for v in context_values)
        pairs = dict(zip(context_keys, context_values))
        scored = [t for t in range(len(y)) if y[t] != IGNORE_INDEX]
        assert len(scored) == K
        queried = []
        for t in scored:
            assert t >= 2 * K and (t - 2 * K) % 2 == 0, "query outside the query slots"
            assert x[t] in pairs, "a query token must be a key of the context"
            assert y[t] == pairs[x[t]], "target must be the value paired with the queried key"
            queried.append(x[t])
        assert sorted(queried) == sorted(context_keys), "each context key is queried exactly once"


def test_mqar_value_never_appears_before_its_key():
    task, b = mqar_batch()
    K = task.num_kv_pairs
    for x in b["inputs"].tolist():
        for j in range(K):
            key, value = x[2 * j], x[2 * j + 1]
            assert x.index(key) == 2 * j and x.index(value) == 2 * j + 1


def test_mqar_non_query_positions_are_zero_without_random_fill():
    task, b = mqar_batch(random_non_queries=False)
    K = task.num_kv_pairs
    rest_inputs = b["inputs"][:, 2 * K:]
    is_query = b["targets"][:, 2 * K:] != IGNORE_INDEX
    assert (rest_inputs[~is_query] == 0).all() and (rest_inputs[is_query] > 0).all()


def test_mqar_query_slots_follow_the_power_law():
    """The first slot drawn has probability proportional to i^(a - 1); the draws of a row are
    distinct. Checked against the definition with 40k draws (standard error < 0.0025)."""
    space, a = 10, 0.3
    slots = power_law_slots(np.random.default_rng(0), 40000, space, 4, a)
    p = np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    p /= p.sum()
    freq = np.bincount(slots[:, 0], minlength=space) / len(slots)
    assert np.abs(freq - p).max() < 0.01
    # second draw: P(second = j) = sum_i p_i * p_j / (1 - p_i), i != j
    second = np.array([sum(p[i] * p[j] / (1 - p[i]) for i in range(space) if i != j) for j in range(space)])
    assert np.abs(np.bincount(slots[:, 1], minlength=space) / len(slots) - second).max() < 0.01
    assert all(len(set(r)) == 4 for r in slots.tolist())


def test_distinct_choices_are_distinct_and_uniform():
    draws = distinct_choices(np.random.default_rng(1), 20000, 6, 3)
    assert all(len(set(r)) == 3 for r in draws.tolist())
    # each element is in a 3-of-6 subset with probability 1/2, and first with probability 1/6
    counts = np.bincount(draws.ravel(), minlength=6) / len(draws)
    assert np.abs(counts - 0.5).max() < 0.02
    assert np.abs(np.bincount(draws[:, 0], minlength=6) / len(draws) - 1 / 6).max() < 0.015


def test_mqar_rejects_configs_that_cannot_hold_the_pairs():
    with pytest.raises(ValueError, match="seq_len"):
        build_task({"name": "mqar", "vocab_size": 256, "seq_len": 60, "num_kv_pairs": 16})
    with pytest.raises(ValueError, match="vocab_size"):
        build_task({"name": "mqar", "vocab_size": 20, "seq_len": 128, "num_kv_pairs": 16})
    with pytest.raises(ValueError, match="power_a"):
        build_task({"name": "mqar", "power_a": 0})


# ------------------------------------------------------------------------------- selective copying

def test_selective_copying_targets_are_the_data_tokens_in_order():
    task = build_task({"name": "selective_copying", "vocab_size": 12, "seq_len": 50, "num_tokens": 7})
    b = task.train_batch(2, 16)
    noise, marker, n = task.noise_token, task.marker_token, task.num_tokens
    for x, y in zip(b["inputs"].tolist(), b["targets"].tolist()):
        body = x[:-n]
        data = [t for t in body if t != noise]
        assert len(data) == n and all(1 <= t < marker for t in data)
        assert x[-n:] == [marker] * n
        assert y[-n:] == data, "the i-th marker's target is the i-th data token of the body"
        assert all(t == IGNORE_INDEX for t in y[:-n])


def test_selective_copying_sequence_accuracy_needs_every_token():
    task = build_task({"name": "selective_copying", "vocab_size": 10, "seq_len": 40, "num_tokens": 6})
    b = task.train_batch(0, 4)
    logits = torch.nn.functional.one_hot(b["targets"].clamp_min(0), 10).float()
    logits[0, -1] = torch.roll(logits[0, -1], 1)           # one wrong token in sequence 0
    m = task.metrics(logits, b)
    assert m["accuracy"] == (4 * 6 - 1, 4 * 6)
    assert m["sequence_accuracy"] == (3, 4)


# ------------------------------------------------------------------------------- induction heads

def test_induction_target_is_the_token_after_the_first_special_token():
    task = build_task({"name": "induction_heads", "vocab_size": 6, "seq_len": 40, "eval_seq_len": 90})
    s = task.special_token
    for b, length in [(task.train_batch(1, 32), 40), (next(task.eval_batches(32)), 90)]:
        assert b["inputs"].shape == (32, length)
        for x, y in zip(b["inputs"].tolist(), b["targets"].tolist()):
            first = x.index(s)
            assert x.count(s) == 2 and x[-1] == s and first + 1 < length - 1
            assert y[-1] == x[first + 1]
            assert all(t == IGNORE_INDEX for t in y[:-1])


# ------------------------------------------------------------------------------- every task

@pytest.mark.parametrize("name", ALL_TASKS)
def test_batches_are_a_function_of_seed_step_and_batch_size(configs, name):
    a, b = build_task(configs[name]), build_task(configs[name])
    assert same_batch(a.train_batch(7, 5), b.train_batch(7, 5))
    assert not torch.equal(a.train_batch(7, 5)["inputs"], a.train_batch(8, 5)["inputs"])
    other = build_task({**configs[name], "seed": 1})
    assert not torch.equal(a.train_batch(7, 5)["inputs"], other.train_batch(7, 5)["inputs"])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_resumed_task_replays_the_batches_of_a_straight_run(configs, name):
    straight = build_task(configs[name])
    seen = [straight.train_batch(step, 6) for step in range(6)]
    resumed = build_task(configs[name])
    resumed.load_state_dict(straight.state_dict())
    for step in range(3, 6):
        assert same_batch(resumed.train_batch(step, 6), seen[step])
    with pytest.raises(ValueError, match="seed"):
        build_task({**configs[name], "seed": 9}).load_state_dict(straight.state_dict())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_eval_set_is_fixed_whatever_the_batch_size(configs, name):
    task = build_task(configs[name])
    whole = [list(task.eval_batches(7)), list(build_task(configs[name]).eval_batches(64))]
    cat = [{k: torch.cat([b[k] for b in bs]) for k in bs[0]} for bs in whole]
    assert same_batch(cat[0], cat[1])
    assert max(len(b["targets"]) for b in whole[0]) == 7


@pytest.mark.parametrize("name", ALL_TASKS)
def test_batches_have_the_contract_shapes_and_dtypes(configs, name):
    task = build_task(configs[name])
    b = task.train_batch(0, 3)
    assert b["targets"].dtype == torch.int64
    if task.kind == "lm":
        assert b["inputs"].dtype == torch.int64 and b["inputs"].shape == (3, task.seq_len)
        assert b["targets"].shape == (3, task.seq_len)
        scored = b["targets"][b["targets"] != IGNORE_INDEX]
        assert ((0 <= b["inputs"]) & (b["inputs"] < task.vocab_size)).all()
        assert ((0 <= scored) & (scored < task.vocab_size)).all() and len(scored) > 0
    else:
        assert b["inputs"].dtype == torch.float32
        assert b["inputs"].shape == (3, task.channels, task.image_size, task.image_size)
        assert ((0 <= b["targets"]) & (b["targets"] < task.num_classes)).all()


@pytest.mark.parametrize("name", ALL_TASKS)
def test_config_rebuilds_the_same_task(configs, name):
    task = build_task(configs[name])
    again = build_task(task.config)
    assert again.config == task.config and same_batch(again.train_batch(3, 4), task.train_batch(3, 4))


@pytest.mark.parametrize("name", ["mqar", "selective_copying", "induction_heads", "images"])
def test_accuracy_of_perfect_and_wrong_predictions(configs, name):
    task = build_task(configs[name])
    size = task.vocab_size or task.num_classes
    total = {"perfect": [0.0, 0.0], "wrong": [0.0, 0.0]}
    for b in task.eval_batches(8):
        onehot = torch.nn.functional.one_hot(b["targets"].clamp_min(0), size).float()
        for kind, logits in (("perfect", onehot), ("wrong", onehot.roll(1, dims=-1))):
            s, n = task.metric(logits, b)
            total[kind][0] += s
            total[kind][1] += n
    assert total["perfect"][0] == total["perfect"][1] > 0 and total["wrong"][0] == 0


def test_build_task_names_the_valid_choices():
    with pytest.raises(ValueError, match="mqar.*selective_copying.*images"):
        build_task({"name": "recall"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_pairs'\].*num_kv_pairs"):
        build_task({"name": "mqar", "num_pairs": 4})
    with pytest.raises(ValueError, match="missing required key.*vocab_size"):
        build_task({"name": "tokens", "path": "x.bin"})
    with pytest.raises(ValueError, match="seq_len"):
        build_task({"name": "induction_heads", "seq_len": 0})
    assert "eval_seq_len" in task_arguments("induction_heads")


# ------------------------------------------------------------------------------- bytes

def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_byte_split_puts_no_file_in_both_splits_and_holds_exactly_their_bytes(corpus):
    task = build_task({"name": "bytes", "paths": corpus, "extensions": [".py"], "seq_len": 16,
                       "val_fraction": 0.3})
    train, val = task.info["train_files"], task.info["val_files"]
    assert not set(train) & set(val) and len(train) + len(val) == 40 and val and train
    assert all(f.endswith(".py") for f in train + val)
    expect_val = b"".join(read(os.path.join(corpus, f)) + b"\0" for f in val)
    expect_train = b"".join(read(os.path.join(corpus, f)) + b"\0" for f in train)
    assert task.windows.val.tobytes() == expect_val and task.windows.train.tobytes() == expect_train


def test_byte_split_does_not_depend_on_where_the_corpus_lives(corpus, tmp_path):
    moved = shutil.copytree(corpus, str(tmp_path / "elsewhere" / "copy"))
    a = build_task({"name": "bytes", "paths": corpus, "seq_len": 16, "val_fraction": 0.3})
    b = build_task({"name": "bytes", "paths": moved, "seq_len": 16, "val_fraction": 0.3})
    assert a.info["val_files"] == b.info["val_files"] and same_batch(a.train_batch(4, 3), b.train_batch(4, 3))


def test_byte_windows_are_contiguous_slices_of_the_training_bytes(corpus):
    task = build_task({"name": "bytes", "paths": corpus, "seq_len": 24, "val_fraction": 0.3})
    train, val = task.windows.train.tobytes(), task.windows.val.tobytes()
    b = task.train_batch(11, 8)
    assert torch.equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for x, y in zip(b["inputs"].tolist(), b["targets"].tolist()):
        assert bytes(x + y[-1:]) in train
    for e in task.eval_batches(4):
        for x, y in zip(e["inputs"].tolist(), e["targets"].tolist()):
            assert bytes(x + y[-1:]) in val


def test_byte_tail_split_holds_out_the_last_bytes(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(256)) * 40)
    task = build_task({"name": "bytes", "paths": str(path), "split": "tail", "val_fraction": 0.25,
                       "seq_len": 32})
    everything = read(path) + b"\0"
    cut = len(everything) - round(len(everything) * 0.25)
    assert task.windows.train.tobytes() == everything[:cut] and task.windows.val.tobytes() == everything[cut:]
    with pytest.raises(ValueError, match="split"):
        build_task({"name": "bytes", "paths": str(path), "seq_len": 32})   # one file cannot split by file


def test_default_byte_corpus_is_the_standard_librarys_python_sources():
    import sysconfig

    task = build_task({"name": "bytes", "seq_len": 64, "num_eval": 4})
    files = task.info["train_files"] + task.info["val_files"]
    assert len(files) > 300 and not set(task.info["train_files"]) & set(task.info["val_files"])
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert "os.py" in files and task.config["extensions"] == [".py"]
    assert os.path.isfile(os.path.join(sysconfig.get_paths()["stdlib"], files[0]))
    assert task.fingerprint()["train_bytes"] > 5_000_000


def test_bits_per_byte_is_mean_cross_entropy_over_ln2(corpus):
    task = build_task({"name": "bytes", "paths": corpus, "seq_len": 12, "val_fraction": 0.3})
    b = task.train_batch(0, 3)
    b["targets"][0, :4] = IGNORE_INDEX                      # ignored positions do not count
    logits = torch.randn(3, 12, 256, generator=torch.Generator().manual_seed(0))
    bits, count = task.metric(logits, b)
    ref, n = 0.0, 0
    lg = logits.double()
    for i in range(3):
        for t in range(12):
            y = int(b["targets"][i, t])
            if y != IGNORE_INDEX:
                ref += (torch.logsumexp(lg[i, t], 0) - lg[i, t, y]).item() / LN2
                n += 1
    assert count == n == 32 and abs(bits - ref) < 1e-4 * ref
    uniform_bits, c = task.metric(torch.zeros(3, 12, 256), b)
    assert abs(uniform_bits / c - 8.0) < 1e-6                  # a uniform guess costs log2(256) bits
    assert task.metric_name == "bits_per_byte" and not task.higher_is_better


def test_bytes_rejects_missing_paths_and_bad_split(tmp_path):
    with pytest.raises(ValueError, match="paths"):
        build_task({"name": "bytes", "paths": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="split"):
        build_task({"name": "bytes", "paths": str(tmp_path), "split": "random"})


# ------------------------------------------------------------------------------- tokens

def test_tokens_memmap_round_trip_bin_and_npy_give_the_same_windows(token_file, tmp_path):
    path, ids = token_file
    np.save(tmp_path / "ids.npy", ids.reshape(50, 100))     # 2-D .npy is read as one stream
    cfg = {"name": "tokens", "vocab_size": 1000, "seq_len": 20, "val_fraction": 0.1}
    a = build_task({**cfg, "path": path})
    b = build_task({**cfg, "path": str(tmp_path / "ids.npy")})
    cut = 5000 - 500
    for task in (a, b):
        assert isinstance(task.windows.train, np.memmap) or task.windows.train.base is not None
        batch = task.train_batch(3, 6)
        for x, y in zip(batch["inputs"].numpy(), batch["targets"].numpy()):
            window = np.concatenate([x, y[-1:]])
            starts = [s for s in range(cut - 20) if ids[s] == window[0] and (ids[s:s + 21] == window).all()]
            assert starts, "every train window is a slice of the training ids"
        for e in task.eval_batches(4):
            for x in e["inputs"].numpy():
                assert any((ids[s:s + 20] == x).all() for s in range(cut, 5000 - 20))
    assert same_batch(a.train_batch(3, 6), b.train_batch(3, 6))


def test_tokens_separate_validation_file_and_dtype(tmp_path):
    train = np.arange(3000, dtype=np.uint32) + 70000         # ids beyond uint16
    val = np.arange(500, dtype=np.uint32)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    task = build_task({"name": "tokens", "path": str(tmp_path / "train.bin"), "val_path": str(tmp_path / "val.bin"),
                       "dtype": "uint32", "vocab_size": 80000, "seq_len": 10, "num_eval": 5})
    b = task.train_batch(0, 4)
    assert (b["inputs"] >= 70000).all() and torch.equal(b["targets"], b["inputs"] + 1)
    evals = torch.cat([e["inputs"] for e in task.eval_batches(2)])
    assert evals.shape == (5, 10) and (evals < 500).all()


def test_tokens_out_of_vocabulary_ids_raise(token_file):
    path, _ = token_file
    task = build_task({"name": "tokens", "path": path, "vocab_size": 500, "seq_len": 20})
    with pytest.raises(ValueError, match="vocab_size"):
        for step in range(20):
            task.train_batch(step, 8)
    with pytest.raises(ValueError, match="dtype"):
        build_task({"name": "tokens", "path": path, "vocab_size": 500, "dtype": "float32"})


def test_tokens_loss_is_mean_cross_entropy_and_perplexity_its_exp(token_file):
    path, _ = token_file
    task = build_task({"name": "tokens", "path": path, "vocab_size": 1000, "seq_len": 8})
    b = task.train_batch(0, 2)
    logits = torch.randn(2, 8, 1000, generator=torch.Generator().manual_seed(1))
    nats, n = task.metric(logits, b)
    lg = logits.double()
    ref = sum((torch.logsumexp(lg[i, t], 0) - lg[i, t, int(b["targets"][i, t])]).item()
              for i in range(2) for t in range(8))
    assert n == 16 and abs(nats - ref) < 1e-4 * ref
    assert abs(task.derived_metrics(nats / n)["perplexity"] - math.exp(ref / 16)) < 1e-3 * math.exp(ref / 16)


# ------------------------------------------------------------------------------- images

def test_digits_images_shapes_classes_and_stratified_split():
    task = build_task({"name": "images"})
    assert (task.num_classes, task.channels, task.image_size) == (10, 1, 32)
    b = task.train_batch(0, 16)
    assert b["inputs"].shape == (16, 1, 32, 32) and b["inputs"].dtype == torch.float32
    val_targets = torch.cat([e["targets"] for e in task.eval_batches(100)])
    fp = task.fingerprint()
    assert fp["train_images"] + fp["val_images"] == 1797 and len(val_targets) == fp["val_images"]
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=10)
    assert torch.bincount(val_targets, minlength=10).tolist() == [round(c * 0.2) for c in per_class]


def test_image_split_is_disjoint_and_covers_every_image():
    from zoo.tasks.images import stratified_split

    y = np.random.default_rng(0).integers(0, 5, size=200)
    tr, va = stratified_split(y, 0.25, split_seed=3)
    assert not set(tr) & set(va) and sorted(np.concatenate([tr, va])) == list(range(200))
    for c in range(5):
        assert len(va[y[va] == c]) == round((y == c).sum() * 0.25)


def test_npz_layouts_give_the_same_images(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(30, 5, 5, 3), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "nhwc.npz", x=x, y=y)
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=y)
    a = build_task({"name": "images", "path": str(tmp_path / "nhwc.npz")})
    b = build_task({"name": "images", "path": str(tmp_path / "nchw.npz")})
    assert (a.channels, a.image_size, a.num_classes) == (3, 5, 3)
    assert same_batch(a.train_batch(2, 7), b.train_batch(2, 7))
    np.savez(tmp_path / "ambiguous.npz", x=np.zeros((4, 3, 5, 3), np.uint8), y=np.zeros(4, int))
    with pytest.raises(ValueError, match="channels_last"):
        build_task({"name": "images", "path": str(tmp_path / "ambiguous.npz")})


def test_images_are_standardised_with_training_statistics(tmp_path):
    g = np.random.default_rng(2)
    x = (g.random((40, 3, 5, 5)) * np.array([3.0, 0.5, 1.0])[None, :, None, None] + 1.0).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(40) % 2)
    task = build_task({"name": "images", "path": str(tmp_path / "f.npz"), "val_fraction": 0.25})
    n = task.fingerprint()["train_images"]
    train = torch.cat([task.train_batch(s, n)["inputs"] for s in range(1)])
    assert train.mean((0, 2, 3)).abs().max() < 1e-5 and (train.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4


def test_image_stream_visits_every_training_image_once_per_epoch_whatever_the_batch_size(tmp_path):
    n = 12
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(n) % 3)
    np.savez(tmp_path / "val.npz", x=x[:3], y=np.arange(3))
    task = build_task({"name": "images", "path": str(tmp_path / "train.npz"),
                       "val_path": str(tmp_path / "val.npz"), "normalize": False})

    def stream(bs, steps):
        return torch.cat([task.train_batch(s, bs)["inputs"][:, 0, 0, 0] for s in range(steps)]).long().tolist()

    by4, by6 = stream(4, 6), stream(6, 4)                  # 24 images = 2 epochs either way
    assert by4 == by6
    assert sorted(by4[:n]) == list(range(n)) and sorted(by4[n:]) == list(range(n)) and by4[:n] != by4[n:]


def test_image_folder_has_one_class_per_subdirectory(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 30), ("dog", 200)):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(3):
            Image.new("L", (10, 7), color=value + i).save(tmp_path / "imgs" / cls / f"{i}.png")
    task = build_task({"name": "images", "path": str(tmp_path / "imgs"), "channels": 1, "image_size": 6,
                       "val_fraction": 0.34, "normalize": False})
    assert task.classes == ["cat", "dog"] and task.num_classes == 2
    b = task.train_batch(0, 4)
    assert b["inputs"].shape == (4, 1, 6, 6)
    for img, label in zip(b["inputs"], b["targets"].tolist()):
        base = (30, 200)[label] / 255
        assert base - 1e-6 <= img.min() and img.max() <= base + 2.5 / 255   # the class's grey level


def test_image_folder_without_pillow_says_how_to_install_it(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "imgs" / "a")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        build_task({"name": "images", "path": str(tmp_path / "imgs")})
