"""RMSNorm, gated RMSNorm and the causal conv1d reference against their definitions."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, randn, random_seq_idx
from kernels.causal_conv1d import causal_conv1d
from layers import GatedRMSNorm, RMSNorm


def test_rmsnorm_matches_definition():
    x = randn(3, 5, 16, seed=1)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(randn(16, seed=2))
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_close(norm(x), expected, 1e-6, "rmsnorm")


def test_weightless_rmsnorm_has_no_parameters():
    assert list(RMSNorm(8, weight=False).parameters()) == []


def test_gated_rmsnorm_groups_normalise_separately():
    x, z = randn(2, 4, 12, seed=3), randn(2, 4, 12, seed=4)
    norm = GatedRMSNorm(12, eps=1e-6, group_size=4)
    g = (x * F.silu(z)).view(2, 4, 3, 4)
    expected = (g / torch.sqrt((g * g).mean(-1, keepdim=True) + 1e-6)).view(2, 4, 12)
    assert_close(norm(x, z), expected, 1e-6, "gated rmsnorm")


def test_bad_norm_group_size_names_the_fix():
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(10, group_size=4)


def _naive_conv(x, w, b, seq_idx=None):
    batch, seqlen, dim = x.shape
    width = w.shape[1]
    y = torch.zeros(batch, seqlen, dim, dtype=torch.float64)
    for bi in range(batch):
        for t in range(seqlen):
            for k in range(width):
                s = t - (width - 1) + k
                if s < 0 or (seq_idx is not None and seq_idx[bi, s] != seq_idx[bi, t]):
                    continue
                y[bi, t] += w[:, k].double() * x[bi, s].double()
    return F.silu(y + b.double())


@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_matches_naive_loop_with_documents(width):
    x, w, b = randn(2, 23, 5, seed=5), randn(5, width, seed=6), randn(5, seed=7)
    sid = random_seq_idx(2, 23, 3, seed=8)
    assert_close(causal_conv1d(x, w, b, "silu"), _naive_conv(x, w, b), 1e-6, "conv")
    assert_close(causal_conv1d(x, w, b, "silu", seq_idx=sid), _naive_conv(x, w, b, sid), 1e-6, "conv seq_idx")


def test_causal_conv1d_state_continuation_equals_full():
    x, w, b = randn(2, 17, 6, seed=9), randn(6, 4, seed=10), randn(6, seed=11)
    full = causal_conv1d(x, w, b, "silu")
    state = torch.zeros(2, 6, 3)
    pieces = [causal_conv1d(x[:, s:e], w, b, "silu", conv_state=state) for s, e in [(0, 1), (1, 2), (2, 9), (9, 17)]]
    assert_close(torch.cat(pieces, 1), full, 1e-6, "conv continuation")


def test_causal_conv1d_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[batch, seqlen, dim\]"):
        causal_conv1d(torch.randn(4, 5), torch.randn(5, 4))
