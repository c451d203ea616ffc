"""Generation: recurrent decode against repeated full forwards, ragged batches, sampling filters,
byte text, and the command line."""
import argparse

import pytest
import torch

import zoo
from zoo.checkpoint import save_pretrained
from zoo.generate import ByteStream, decode_tokens, encode_prompt, generate, sample_next

HYBRID = {"d_model": 16, "vocab_size": 32, "pattern": "M*-M", "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 4},
          "attention": {"n_heads": 2}, "mlp": {"d_ff": 32}}


def sharpened(model):
    """Larger random weights than the init so that logits depend strongly on the context (with the
    small init a decode bug could hide behind near-uniform predictions)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sharpened(zoo.build_model(HYBRID))


def greedy_by_full_forwards(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


def test_greedy_generation_matches_argmax_of_full_forwards(model):
    ids = torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(1))
    out = generate(model, ids, max_new_tokens=9, temperature=0)
    assert out.shape == (3, 16)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, 9))


def test_ragged_batch_rows_continue_their_own_prompts(model):
    prompts = [[5, 1, 9], [2, 7, 7, 3, 30, 11], [4]]
    out = generate(model, prompts, max_new_tokens=5, temperature=0)
    for prompt, row in zip(prompts, out):
        alone = greedy_by_full_forwards(model, torch.tensor([prompt]), 5)[0].tolist()
        assert row == alone


def test_single_token_prompt_and_zero_new_tokens(model):
    ids = torch.tensor([[3]])
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)
    assert torch.equal(generate(model, ids, max_new_tokens=4, temperature=0), greedy_by_full_forwards(model, ids, 4))


def test_sampling_is_reproducible_with_a_seed(model):
    ids = torch.tensor([[1, 2, 3]])
    a = generate(model, ids, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, ids, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(a, b)


def test_eos_stops_a_row_and_pads_it(model):
    ids = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(5))
    greedy = greedy_by_full_forwards(model, ids, 6)
    eos = int(greedy[0, 5])                     # row 0's second new token
    out = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=eos)
    assert out[0, :6].tolist() == greedy[0, :6].tolist() and (out[0, 6:] == eos).all()


def test_top_p_samples_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, top_p=0.7, generator=g)
    # 0.5 < 0.7 so token 1 is needed; 0.5 + 0.3 >= 0.7 so tokens 2 and 3 are cut
    assert set(drawn.tolist()) == {0, 1}
    frac = (drawn == 0).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.08             # renormalised over the nucleus


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(300, 1)
    drawn = sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}
    assert torch.equal(sample_next(logits[:1], top_k=1), torch.tensor([1]))


def test_bad_sampling_arguments_name_the_argument():
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 4), top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 4), temperature=-1.0)


def test_byte_text_round_trip_and_incremental_decoding():
    text = "héllo ✓"
    ids = encode_prompt(text, byte_level=True)
    assert ids == list(text.encode("utf-8")) and decode_tokens(ids, True) == text
    stream = ByteStream()
    assert "".join(stream.feed(t) for t in ids) + stream.flush() == text
    broken = [0xE2, 0x9C, 0x41]                     # a cut multi-byte character, then "A"
    stream = ByteStream()
    assert "".join(stream.feed(t) for t in broken) + stream.flush() == bytes(broken).decode("utf-8", "replace")
    assert encode_prompt("4 8 15", byte_level=False) == [4, 8, 15]
    with pytest.raises(ValueError, match="space-separated"):
        encode_prompt("hello", byte_level=False)


def test_generate_command_streams_byte_text(tmp_path, capsys):
    from zoo.commands import generate as command
    torch.manual_seed(0)
    model = sharpened(zoo.build_model({**HYBRID, "vocab_size": 256}))
    save_pretrained(model, str(tmp_path / "m"))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0"])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    expected = greedy_by_full_forwards(model, torch.tensor([[97, 98]]), 5)[0].tolist()
    assert out == decode_tokens(expected, byte_level=True) + "\n"
    args = parser.parse_args([str(tmp_path / "m"), "--prompt", "ab", "--prompt", "xyz", "--max-new-tokens", "3"])
    assert command.run(args) == 0
    out = capsys.readouterr().out          # (sampled bytes may hold newlines: no splitlines)
    assert out.startswith("[0] ab") and "\n[1] xyz" in out


# ---------------------------------------------------------------- static KV caches and CUDA graphs

from conftest import requires_cuda  # noqa: E402
from zoo.generate import CUDAGraphDecoder, make_static  # noqa: E402

# every layer type a CUDA graph can hold, with the attention options the static cache must honour,
# and a Zamba-style shared attention block (each site its own cache)
GRAPHABLE = {"d_model": 16, "vocab_size": 32, "pattern": "mM*-M", "symbols": {"m": "mamba"},
             "mamba": {"d_state": 4}, "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 4},
             "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": True, "qk_norm": True, "window": 5},
             "mlp": {"d_ff": 32},
             "shared": {"blk": {"input": "concat_embeddings", "blocks": ["attention", "mlp"]}},
             "insert": {"blk": {"at": 1, "every": 3}}}
WITH_MOE = {**HYBRID, "pattern": "ME", "moe": {"d_ff": 16, "num_experts": 4, "top_k": 2}}


def test_static_kv_cache_decode_matches_full_forwards_with_window_gqa_rope_and_shared_sites():
    torch.manual_seed(0)
    model = sharpened(zoo.build_model(GRAPHABLE))
    ids = torch.randint(0, 32, (2, 3), generator=torch.Generator().manual_seed(2))
    # 12 new tokens: past the window of 5, so the static cache's window mask is exercised
    assert torch.equal(generate(model, ids, max_new_tokens=12, temperature=0),
                       greedy_by_full_forwards(model, ids, 12))


def test_static_kv_cache_needs_a_preallocated_cache():
    torch.manual_seed(0)
    model = zoo.build_model(HYBRID)
    with pytest.raises(ValueError, match="preallocated"):
        make_static(model.init_state(1))                     # growing caches cannot become static
    state = model.init_state(1, max_seqlen=8)
    make_static(state)
    with pytest.raises(ValueError, match="seq_idx"):
        model(torch.tensor([[1]]), state=state, seq_idx=torch.zeros(1, 1, dtype=torch.int32))


def test_cuda_graph_on_cpu_is_an_error_and_auto_decodes_eagerly(model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="CUDA device"):
        generate(model, ids, max_new_tokens=3, cuda_graph=True)
    assert torch.equal(generate(model, ids, max_new_tokens=3, temperature=0, cuda_graph=None),
                       generate(model, ids, max_new_tokens=3, temperature=0, cuda_graph=False))


def test_generate_command_cuda_graph_on_without_cuda_exits_with_the_reason(tmp_path, capsys):
    from zoo.commands import generate as command
    torch.manual_seed(0)
    save_pretrained(zoo.build_model(HYBRID), str(tmp_path / "m"))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "m"), "--prompt", "1 2", "--max-new-tokens", "2",
                              "--device", "cpu", "--cuda-graph", "on"])
    assert command.run(args) == 2
    assert "CUDA device" in capsys.readouterr().err


def _cuda_model(cfg, dtype):
    torch.manual_seed(0)
    return sharpened(zoo.build_model(cfg)).to(device="cuda", dtype=dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [HYBRID, GRAPHABLE, {**HYBRID, "pattern": "MM"},
                                 {**HYBRID, "pattern": "mm", "symbols": {"m": "mamba"}, "mamba": {"d_state": 4}}],
                         ids=["hybrid", "graphable", "mamba2", "mamba"])
def test_cuda_graph_decode_is_token_identical_to_eager(cfg, dtype):
    model = _cuda_model(cfg, dtype)
    ids = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    eager = generate(model, ids, max_new_tokens=20, temperature=0, cuda_graph=False)
    graph = generate(model, ids, max_new_tokens=20, temperature=0, cuda_graph=True)
    assert torch.equal(graph, eager)
    if dtype == torch.float32:                 # and both are the argmax of full forwards
        assert torch.equal(eager, greedy_by_full_forwards(model, ids.cuda(), 20).cpu())
    prompts = [[5, 1, 9], [2, 7, 7, 3, 30, 11], [4]]          # ragged rows feed prompt tokens through the graph
    assert generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=True) == \
        generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=False)
    eos = int(eager[0, 7])
    assert torch.equal(generate(model, ids, max_new_tokens=9, temperature=0, eos_token_id=eos, cuda_graph=True),
                       generate(model, ids, max_new_tokens=9, temperature=0, eos_token_id=eos, cuda_graph=False))
    a = generate(model, ids, max_new_tokens=9, temperature=1.0, top_p=0.9, seed=3, cuda_graph=True)
    assert torch.equal(a, generate(model, ids, max_new_tokens=9, temperature=1.0, top_p=0.9, seed=3, cuda_graph=False))


@requires_cuda
def test_cuda_graph_decoder_leaves_the_state_it_was_given_and_updates_it_like_eager_steps():
    model = _cuda_model(GRAPHABLE, torch.float32)
    ids = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        states = []
        for _ in range(2):
            state = model.init_state(2, max_seqlen=16)
            model(ids, state=state)
            make_static(state)
            states.append(state)
        eager, graph_state = states
        step = CUDAGraphDecoder(model, graph_state)       # capture's warm-up steps must not leak
        tok = ids[:, -1]
        for _ in range(5):
            want = model(tok[:, None], state=eager).logits[:, -1]
            got = step(tok)
            assert torch.equal(got, want)
            tok = want.argmax(-1)
        from zoo.generate import _state_tensors
        for a, b in zip(_state_tensors(graph_state), _state_tensors(eager)):
            assert torch.equal(a, b)


@requires_cuda
def test_cuda_graph_refuses_moe_and_auto_falls_back_to_eager():
    model = _cuda_model(WITH_MOE, torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="MoE"):
        generate(model, ids, max_new_tokens=3, cuda_graph=True)
    assert torch.equal(generate(model, ids, max_new_tokens=4, temperature=0),
                       greedy_by_full_forwards(model, ids.cuda(), 4).cpu())
