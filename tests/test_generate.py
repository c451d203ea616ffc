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
