"""Checkpoints: the zoo format round trip, shared tensors, atomic writes that survive interruption."""
import os

import pytest
import torch
from safetensors import safe_open

import zoo
from zoo import checkpoint as ckpt
from zoo.config import load_run_config
from zoo.train import Trainer

TINY = {"d_model": 16, "vocab_size": 32, "pattern": "M*-", "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
        "attention": {"n_heads": 2}, "mlp": {"d_ff": 32}}


def tiny_run(**trainer):
    return {"model": dict(TINY), "task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2,
                                          "num_eval": 8},
            "trainer": {"steps": 4, "batch_size": 4, "log_every": 1, "warmup": 1, "eval_batches": 1,
                        "progress": False, **trainer}}


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = zoo.build_model(TINY)
    ckpt.save_pretrained(model, str(tmp_path / "m"))
    loaded = zoo.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    ids = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = zoo.build_model(TINY)
    assert model.lm_head.weight is model.embedding.weight        # tie_embeddings defaults to true
    ckpt.save_pretrained(model, str(tmp_path / "m"))
    with safe_open(str(tmp_path / "m" / ckpt.WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert ("embedding.weight" in keys) != ("lm_head.weight" in keys)
    loaded = zoo.from_pretrained(str(tmp_path / "m"))
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_views_of_one_storage_round_trip():
    base = torch.arange(12.0)
    sd = {"a": base, "b": base, "c": base[:6].view(2, 3)}
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    ckpt.save_weights(sd, path)
    back = ckpt.load_weights(path)
    assert set(back) == {"a", "b", "c"}
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    trainer = Trainer(load_run_config(tiny_run(steps=4)), str(tmp_path), log=lambda m: None)
    trainer.fit(until=2)
    good = trainer.save_checkpoint()
    weights_at_2 = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.fit(until=3)

    real_save = torch.save

    def dies_half_way(obj, path, *a, **k):
        with open(path, "wb") as f:           # a partial file, as a killed process leaves it
            f.write(b"\x80partial")
        raise KeyboardInterrupt("killed while writing the training state")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    root = tmp_path / ckpt.CHECKPOINTS_DIR
    assert not (root / ckpt.checkpoint_name(3)).exists()
    # a leftover temporary directory of a harder kill is ignored, then cleaned by the next save
    os.makedirs(root / ".tmp-step_00000003-x")
    (root / ".tmp-step_00000003-x" / ckpt.WEIGHTS_FILE).write_bytes(b"junk")
    assert ckpt.latest_checkpoint(str(tmp_path)) == good

    resumed = Trainer(load_run_config(tiny_run(steps=4)), str(tmp_path), resume=True, log=lambda m: None)
    assert resumed.step == 2
    for k, v in resumed.raw_model.state_dict().items():
        assert torch.equal(v, weights_at_2[k]), k
    resumed.fit()
    assert not (root / ".tmp-step_00000003-x").exists()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith(ckpt.checkpoint_name(4))


def test_latest_pointer_to_a_missing_directory_falls_back_to_the_newest_complete(tmp_path):
    trainer = Trainer(load_run_config(tiny_run(steps=3, ckpt_every=1, keep_checkpoints=3)), str(tmp_path),
                      log=lambda m: None)
    trainer.fit()
    root = tmp_path / ckpt.CHECKPOINTS_DIR
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == [ckpt.checkpoint_name(s) for s in (1, 2, 3)]
    os.remove(root / ckpt.checkpoint_name(3) / ckpt.TRAINING_FILE)        # damaged by hand
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith(ckpt.checkpoint_name(2))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    Trainer(load_run_config(tiny_run(steps=4, ckpt_every=1, keep_checkpoints=2)), str(tmp_path),
            log=lambda m: None).fit()
    names = sorted(n for n in os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR) if n.startswith("step_"))
    assert names == [ckpt.checkpoint_name(3), ckpt.checkpoint_name(4)]


def test_from_pretrained_reads_a_run_directory(tmp_path):
    trainer = Trainer(load_run_config(tiny_run(steps=2)), str(tmp_path), log=lambda m: None)
    trainer.fit()
    model = zoo.from_pretrained(str(tmp_path))
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_from_pretrained_names_what_it_expected(tmp_path):
    with pytest.raises(ValueError, match="config.yaml"):
        zoo.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="Hugging Face"):
        zoo.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        zoo.from_pretrained(str(tmp_path / "nope"))
