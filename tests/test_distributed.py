"""The distributed path on CPU: 2 processes over gloo, the same Trainer code torchrun runs.

Rank r of w reads micro-batch (step * grad_accum + m) * w + r, and DDP averages gradients, so two
processes with batch b equal one process accumulating two micro-batches of b: same batches, same
mean gradient. That makes a one-process run the reference for the two-process one.
"""
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from zoo.config import load_run_config
from zoo.train import Trainer


def tiny_run(**trainer):
    return {"model": {"d_model": 16, "pattern": "M*", "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
                      "attention": {"n_heads": 2}},
            "task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_eval": 8},
            "trainer": {"steps": 3, "batch_size": 4, "log_every": 1, "warmup": 1, "eval_batches": 2,
                        "progress": False, "device": "cpu", **trainer}}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]      # held open together: n distinct ports
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    """Both parallel modes in one pair of processes (each start costs seconds of imports); each mode
    rendezvous on its own port (re-using a closed store's port can hang the second init)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    for parallel, port in zip(("ddp", "fsdp"), ports):
        os.environ["MASTER_PORT"] = str(port)
        run_dir = os.path.join(out_dir, parallel)
        trainer = Trainer(load_run_config(tiny_run(parallel=parallel)), run_dir, log=lambda m: None)
        try:
            trainer.fit()
            # every rank's own full copy (FSDP all-gathers its shards), to compare across ranks
            state = get_model_state_dict(trainer.raw_model, options=StateDictOptions(full_state_dict=True))
            torch.save({k: v.detach().clone() for k, v in state.items()}, os.path.join(run_dir, f"weights_rank{rank}.pt"))
        finally:
            trainer.close()


def test_two_gloo_processes_agree_and_match_one_process_accumulating(tmp_path):
    ports = _free_ports(2)
    context = mp.spawn(_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180        # a stuck collective must fail the test, not hang CI
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise AssertionError("the two gloo processes did not finish within 180 s")
    single = Trainer(load_run_config(tiny_run(grad_accum=2)), str(tmp_path / "one"), log=lambda m: None)
    single.fit()
    reference = single.raw_model.state_dict()
    for parallel in ("ddp", "fsdp"):
        run_dir = tmp_path / parallel
        ranks = [torch.load(run_dir / f"weights_rank{r}.pt") for r in range(2)]
        for name, w in ranks[0].items():
            assert torch.equal(w, ranks[1][name]), f"{parallel}: ranks disagree on {name}"
            torch.testing.assert_close(w, reference[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{parallel} {name}: {m}")
        # rank 0 wrote the run; its checkpoint resumes in a single process
        resumed = Trainer(load_run_config(tiny_run()), str(run_dir), resume=True, log=lambda m: None)
        assert resumed.step == 3
        for name, w in resumed.raw_model.state_dict().items():
            assert torch.equal(w, ranks[0][name]), f"{parallel}: {name}"
