"""The Trainer and run configs: learning, exact resume, schedule, weight-decay groups, config errors."""
import json
import math
import os

import pytest
import torch

from zoo.config import ConfigError, TrainerConfig, load_run_config, parse_overrides
from zoo.train import Trainer, lr_at, param_groups


def tiny_run(**trainer) -> dict:
    """A 3-sublayer hybrid (Mamba-2, attention, MLP) on a small MQAR: seconds on one CPU core."""
    return {
        "model": {"d_model": 16, "pattern": "M*-", "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
                  "attention": {"n_heads": 2}, "mlp": {"d_ff": 32}},
        "task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_eval": 16},
        "trainer": {"steps": 8, "batch_size": 4, "log_every": 1, "warmup": 2, "lr": 1e-2,
                    "eval_batches": 2, "progress": False, **trainer},
    }


def quiet(_msg):
    pass


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_reduces_eval_loss(tmp_path):
    trainer = Trainer(load_run_config(tiny_run(steps=25, warmup=3, lr=3e-2, batch_size=8)), str(tmp_path), log=quiet)
    before = trainer.evaluate()["eval_loss"]
    summary = trainer.fit()
    # MQAR answers are values from the upper half of the vocabulary: even that alone takes the loss
    # from ln(32) toward ln(16), so a working optimiser must move well below the starting loss
    assert before > math.log(32) - 0.5
    assert summary["eval_loss"] < before - 0.3, (before, summary["eval_loss"])
    assert summary["steps"] == 25 and summary["tokens"] == 25 * 8 * 16


def test_resume_gives_identical_losses_and_weights(tmp_path):
    cfg = tiny_run(steps=8, ckpt_every=4, grad_accum=2)
    straight = Trainer(load_run_config(cfg), str(tmp_path / "a"), log=quiet)
    straight.fit()
    first = Trainer(load_run_config(cfg), str(tmp_path / "b"), log=quiet)
    first.fit(until=6)                 # stops after step 6; the newest checkpoint is step 4
    resumed = Trainer(load_run_config(cfg), str(tmp_path / "b"), resume=True, log=quiet)
    assert resumed.step == 4
    resumed.fit()
    a = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_rows(tmp_path / "a")]
    b = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_rows(tmp_path / "b")]
    assert a == b                      # exactly equal floats, and rows 5-6 of the killed run dropped
    for (name, p), q in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_metrics_files_have_training_and_eval_columns(tmp_path):
    Trainer(load_run_config(tiny_run(steps=4, log_every=2, eval_every=2)), str(tmp_path), log=quiet).fit()
    header = open(tmp_path / "metrics.csv").readline().strip().split(",")
    for col in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_accuracy"):
        assert col in header
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["layout"] == "M*-" and summary["metric_name"] == "accuracy"
    assert 0.0 <= summary["metric"] <= 1.0


def test_lr_schedule_is_linear_warmup_then_cosine_to_floor():
    cfg = TrainerConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(109, cfg) == pytest.approx(0.1)
    mid = 10 + 99 / 2                  # half way through the decay: floor + half the range
    assert lr_at(int(mid), cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    flat = TrainerConfig(steps=50, warmup=5, lr=0.5, cosine=False)
    assert lr_at(30, flat) == 0.5


def test_weight_decay_skips_norms_biases_and_ssm_dynamics():
    import zoo
    model = zoo.build_model({**tiny_run()["model"], "vocab_size": 32})
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for n in ("layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias", "layers.0.norm.weight",
              "norm_f.weight", "layers.0.mixer.conv1d.bias"):
        assert n in kept, n
    for n in ("layers.0.mixer.in_proj.weight", "layers.1.mixer.q_proj.weight", "embedding.weight"):
        assert n in decayed, n
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_overrides_parse_yaml_values_and_reach_every_section():
    ov = parse_overrides(["trainer.lr=3e-4", "trainer.betas=[0.9, 0.99]", "trainer.cosine=false",
                          "model.pattern=*-*-", "task.seq_len=32"])
    assert ov["trainer.lr"] == 3e-4 and ov["trainer.betas"] == [0.9, 0.99] and ov["trainer.cosine"] is False
    run = load_run_config(tiny_run(), ov)
    assert run.trainer.lr == 3e-4 and run.trainer.betas == [0.9, 0.99]
    assert run.model["pattern"] == "*-*-" and run.task["seq_len"] == 32


@pytest.mark.parametrize("source, overrides, needle", [
    ({"trainer": {"lrr": 1.0}}, [], "trainer.lrr"),
    ({"trainer": {"steps": "many"}}, [], "trainer.steps"),
    ({"trainer": {"device": "tpu"}}, [], "trainer.device"),
    ({"trainer": {"min_lr_ratio": 2.0}}, [], "trainer.min_lr_ratio"),
    ({"optimizer": {}}, [], "optimizer"),
    ({}, ["trainer.warmpu=3"], "trainer.warmpu"),
    ({}, ["lr=3"], "--set lr"),
    ({}, ["trainer.lr"], "KEY=VALUE"),
])
def test_config_errors_name_the_key(source, overrides, needle):
    cfg = tiny_run()
    for section, value in source.items():
        if section in cfg:
            cfg[section].update(value)
        else:
            cfg[section] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("-", r"\-")):
        load_run_config(cfg, overrides)


def test_unknown_trainer_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'warmup'"):
        load_run_config(tiny_run(warmpu=3))


def test_model_vocab_smaller_than_task_is_an_error(tmp_path):
    cfg = tiny_run()
    cfg["model"]["vocab_size"] = 8
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Trainer(load_run_config(cfg), str(tmp_path), log=quiet)


def test_existing_run_needs_resume(tmp_path):
    Trainer(load_run_config(tiny_run(steps=2)), str(tmp_path), log=quiet).fit()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(load_run_config(tiny_run(steps=2)), str(tmp_path), log=quiet)


def test_train_command_runs_from_yaml(tmp_path, capsys):
    import argparse

    import yaml

    from zoo.commands import train as command

    def main(argv):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return command.run(parser.parse_args(argv))

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(steps=3)))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--set", "trainer.log_every=3"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-2])
    assert printed["steps"] == 3 and os.path.isdir(out / "checkpoints")
    assert main([str(path), "--out", str(tmp_path / "x"), "--set", "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err


def test_init_from_fine_tunes_a_checkpoint_without_restating_its_model(tmp_path):
    """trainer.init_from starts from a checkpoint's weights (its model config when `model:` is left
    out); a model that does not fit the checkpoint is an error naming the tensor."""
    first = Trainer(load_run_config(tiny_run(steps=3)), str(tmp_path / "a"), log=quiet)
    first.fit()
    run = tiny_run(steps=2, init_from=str(tmp_path / "a"))
    del run["model"]
    second = Trainer(load_run_config(run), str(tmp_path / "b"), log=quiet)
    for key, value in first.raw_model.state_dict().items():
        assert torch.equal(second.raw_model.state_dict()[key], value), key
    assert second.evaluate()["eval_loss"] == pytest.approx(first.evaluate()["eval_loss"], rel=1e-6)
    second.fit()
    wider = tiny_run(steps=2, init_from=str(tmp_path / "a"))
    wider["model"]["d_model"] = 32
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(load_run_config(wider), str(tmp_path / "c"), log=quiet)


def test_init_from_reads_hugging_face_checkpoints(tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5.0")
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=32, hidden_size=16, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=8, n_groups=1,
        chunk_size=8))
    hf.save_pretrained(tmp_path / "hf")
    run = tiny_run(steps=2, init_from=str(tmp_path / "hf"))
    del run["model"]
    trainer = Trainer(load_run_config(run), str(tmp_path / "run"), log=quiet)
    for key, value in hf.state_dict().items():
        zoo_key = key.replace("backbone.embeddings", "embedding").replace("backbone.norm_f", "norm_f") \
                     .replace("backbone.layers", "layers")
        assert torch.equal(trainer.raw_model.state_dict()[zoo_key].cpu(), value), key
    trainer.fit()


def test_missing_model_without_init_from_names_both_fixes():
    run = tiny_run()
    del run["model"]
    with pytest.raises(ConfigError, match="init_from"):
        load_run_config(run)
