"""Multi-head attention with GQA/MQA, RoPE (full or partial), sliding window, QK-norm, packed documents
and a KV cache that continues for any number of new tokens.

x: [batch, seqlen, d_model] -> y: [batch, seqlen, d_model]

Backends: "sdpa" (default; torch's scaled_dot_product_attention, which runs FlashAttention-2 or cuDNN
on CUDA when no explicit mask is needed and the memory-efficient kernel when one is), "math" (the
explicit fp32 softmax(QK^T) V used as the reference in tests), "flash_attn" (the flash_attn package,
when installed; inputs it cannot take fall back to "sdpa", see Attention.forward).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import INIT_STD, check_positive
from .norm import RMSNorm
from .rope import RopeTable, apply_rope, rotary_dim_for

BACKENDS = ("sdpa", "flash_attn", "math")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class KVCache:
    """Inference state of one attention layer.

    k, v: [batch, n_kv_heads, capacity, head_dim], keys already rotated by RoPE at their absolute
    positions; the first `length` slots along dim 2 are valid. Growing caches (no max_seqlen) have
    capacity == length and grow by concatenation; preallocated ones write into a fixed buffer.
    seq_idx: [batch, capacity] int32 document id of each cached key.
    seqlen_offset: tokens seen so far, i.e. the absolute position of the next token. With a sliding
    window the cache keeps only the keys a future query can see, so the cached keys cover positions
    seqlen_offset - length ... seqlen_offset - 1.
    has_documents: a seq_idx was passed at least once, so document masking applies to the cache.
    position: None, or (after `to_static`) the next token's absolute position as an int64 device
    tensor [1]: the cache is then static, for CUDA graphs (see Attention.forward).
    """

    k: torch.Tensor
    v: torch.Tensor
    seq_idx: torch.Tensor
    length: int = 0
    seqlen_offset: int = 0
    preallocated: bool = False
    has_documents: bool = False
    position: torch.Tensor | None = None

    def to_static(self) -> None:
        """From now on keep the position on the device: each step writes its keys at `position` and
        attends over the whole buffer with later slots masked, so no shape, slice or host value
        changes from one token to the next and a decode step can be captured in a CUDA graph.
        `length` and `seqlen_offset` stop advancing. Needs a preallocated cache (init_state's
        max_seqlen) with room for every token still to come (no sliding), and no documents."""
        if self.position is not None:
            return
        if not self.preallocated or self.has_documents or self.key_start != 0:
            raise ValueError("KVCache.to_static needs a preallocated cache (init_state(max_seqlen=...)) that "
                             "holds every key from position 0 and no seq_idx documents")
        self.position = torch.tensor([self.seqlen_offset], dtype=torch.long, device=self.k.device)

    @property
    def key_start(self) -> int:
        """Absolute position of the first cached key."""
        return self.seqlen_offset - self.length

    def append(self, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor, keep: int | None) -> None:
        """Add new keys/values [batch, n_kv_heads, seqlen, head_dim] and their document ids [batch, seqlen].

        keep: how many of the old keys any new or future query can still see (window - 1 with a
        sliding window, None for all); a preallocated buffer drops the others when it would overflow.
        """
        new = k.shape[2]
        if not self.preallocated:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.seq_idx = torch.cat([self.seq_idx, seq_idx], dim=1)
        else:
            capacity = self.k.shape[2]
            if self.length + new > capacity and keep is not None and keep < self.length:
                # Slide the keys still visible to the front of the buffer.
                src = slice(self.length - keep, self.length)
                self.k[:, :, :keep] = self.k[:, :, src].clone()
                self.v[:, :, :keep] = self.v[:, :, src].clone()
                self.seq_idx[:, :keep] = self.seq_idx[:, src].clone()
                self.length = keep
            if self.length + new > capacity:
                raise ValueError(f"the KV cache holds max_seqlen={capacity} tokens and already has "
                                 f"{self.length}; {new} more do not fit: pass a larger max_seqlen to "
                                 f"init_state (or none, to grow the cache by concatenation)")
            end = self.length + new
            self.k[:, :, self.length:end] = k
            self.v[:, :, self.length:end] = v
            self.seq_idx[:, self.length:end] = seq_idx
        self.length += new
        self.seqlen_offset += new

    def trim(self, keep: int) -> None:
        """Growing caches with a sliding window keep only the last `keep` keys (memory stays O(window))."""
        if not self.preallocated and self.length > keep:
            self.k = self.k[:, :, self.length - keep:]
            self.v = self.v[:, :, self.length - keep:]
            self.seq_idx = self.seq_idx[:, self.length - keep:]
            self.length = keep

    def valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k[:, :, :self.length], self.v[:, :, :self.length], self.seq_idx[:, :self.length]


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None,
                   q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where query i may see key j.

    q_pos: [seqlen_q], k_pos: [seqlen_k] absolute positions; q_doc: [batch, seqlen_q], k_doc:
    [batch, seqlen_k] document ids (or None). Returns [batch or 1, 1, seqlen_q, seqlen_k].
    """
    offset = q_pos[:, None] - k_pos[None, :]  # [seqlen_q, seqlen_k]
    allowed = torch.ones_like(offset, dtype=torch.bool)
    if causal:
        allowed &= offset >= 0
    if window is not None:
        allowed &= offset < window
    allowed = allowed[None, None]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in fp32, the definition the fused backends are tested against.

    q: [batch, nheads, seqlen_q, head_dim]; k, v: [batch, n_kv_heads, seqlen_k, head_dim]; query head h
    reads key/value head h // (nheads / n_kv_heads). mask: bool, broadcastable to
    [batch, nheads, seqlen_q, seqlen_k]. Returns [batch, nheads, seqlen_q, head_dim] in q's dtype.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).to(q.dtype)


class Attention(nn.Module):
    """Multi-head softmax attention (Vaswani et al., 2017) with grouped-query heads (Ainslie et al., 2023).

    d_model: model width. n_heads: query heads. n_kv_heads: key/value heads (None = n_heads; 1 = MQA;
    must divide n_heads). head_dim: channels per head (None = d_model // n_heads). causal: each token
    sees only earlier ones (False for encoders / Vision Mamba). rope: rotary positions; rope_theta:
    their base; rope_fraction: share of each head's channels rotated (first channels, NeoX layout,
    see layers/rope.py). max_position_embeddings: if set, positions beyond it are an error.
    window: sliding window, each query sees at most `window` keys, itself included (causal only).
    qk_norm: RMSNorm over each head's channels of q and k, before RoPE (params q_norm, k_norm).
    bias: biases on q/k/v/o projections. softmax_scale: None = head_dim ** -0.5. backend: "sdpa" |
    "flash_attn" | "math".

    Params: q_proj [n_heads*head_dim, d_model], k_proj and v_proj [n_kv_heads*head_dim, d_model],
    o_proj [d_model, n_heads*head_dim] (+ q_norm.weight, k_norm.weight [head_dim]).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 causal: bool = True, rope: bool = False, rope_theta: float = 10000.0,
                 rope_fraction: float = 1.0, max_position_embeddings: int | None = None,
                 window: int | None = None, qk_norm: bool = False, bias: bool = False,
                 softmax_scale: float | None = None, backend: str = "sdpa", device=None, dtype=None):
        super().__init__()
        check_positive(d_model=d_model, n_heads=n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        check_positive(n_kv_heads=n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}: each key/value head "
                             f"serves a group of n_heads / n_kv_heads query heads")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}: change n_heads "
                                 f"or set head_dim explicitly")
            head_dim = d_model // n_heads
        check_positive(head_dim=head_dim)
        if window is not None:
            check_positive(window=window)
            if not causal:
                raise ValueError(f"window={window} needs causal=True: the sliding window counts the keys "
                                 f"before each query (set window=None for bidirectional attention)")
        if max_position_embeddings is not None:
            check_positive(max_position_embeddings=max_position_embeddings)
        if rope and not rope_theta > 0:
            raise ValueError(f"rope_theta={rope_theta} must be positive (10000 is the usual base)")
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(f"softmax_scale={softmax_scale} must be positive, or None for head_dim ** -0.5")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not an attention backend: use one of {', '.join(BACKENDS)}")
        if backend == "flash_attn" and not flash_attn_available():
            raise ValueError("backend='flash_attn' needs the flash_attn package, which is not installed: "
                             "`pip install flash-attn` (builds from source), or use backend='sdpa', which "
                             "runs FlashAttention-2 / cuDNN kernels inside PyTorch")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal, self.window, self.backend = causal, window, backend
        self.rope, self.rope_theta, self.rope_fraction = rope, rope_theta, rope_fraction
        self.rotary_dim = rotary_dim_for(head_dim, rope_fraction) if rope else 0
        self._rope_table = RopeTable(self.rotary_dim, rope_theta) if rope else None
        self.max_position_embeddings = max_position_embeddings
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, **factory)
            self.k_norm = RMSNorm(head_dim, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projection weights ~ N(0, 0.02^2), biases zero, QK-norm scales one."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=INIT_STD)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.qk_norm:
            nn.init.ones_(self.q_norm.weight)
            nn.init.ones_(self.k_norm.weight)

    def init_state(self, batch_size: int, *, dtype=None, device=None, max_seqlen: int | None = None,
                   **kwargs) -> KVCache:
        """An empty KV cache. max_seqlen: preallocate room for that many cached tokens (else grow by
        concatenation). dtype/device default to the projection weights'."""
        if not self.causal:
            raise ValueError("init_state: a KV cache continues causal attention; this layer has causal=False, "
                             "which has no incremental form (run the whole sequence at once)")
        check_positive(batch_size=batch_size)
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        capacity = 0
        if max_seqlen is not None:
            check_positive(max_seqlen=max_seqlen)
            capacity = max_seqlen
        shape = (batch_size, self.n_kv_heads, capacity, self.head_dim)
        return KVCache(k=torch.zeros(shape, dtype=dtype, device=device),
                       v=torch.zeros(shape, dtype=dtype, device=device),
                       seq_idx=torch.zeros(batch_size, capacity, dtype=torch.int32, device=device),
                       preallocated=max_seqlen is not None)

    def forward(self, x: torch.Tensor, *, state: KVCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: [batch, seqlen, d_model] -> [batch, seqlen, d_model].

        state: a KVCache from init_state; the new tokens attend to every cached key (within the window
        and their document) and are appended. seq_idx: int32 [batch, seqlen] non-decreasing document
        ids; tokens see only keys of their own document. With a state and no seq_idx the new tokens
        continue the last cached document.
        """
        batch, seqlen, width = x.shape
        if width != self.d_model:
            raise ValueError(f"Attention expects x of shape [batch, seqlen, d_model={self.d_model}], got {tuple(x.shape)}")
        if seq_idx is not None and tuple(seq_idx.shape) != (batch, seqlen):
            raise ValueError(f"seq_idx must have shape [batch, seqlen] = {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
        if state is not None and not self.causal:
            raise ValueError("state= needs causal attention; this layer has causal=False")
        if state is not None and state.position is not None:
            if seq_idx is not None:
                raise ValueError("a static KV cache (KVCache.to_static) takes no seq_idx")
            return self._forward_static(x, state)
        offset = state.seqlen_offset if state is not None else 0
        if self.max_position_embeddings is not None and offset + seqlen > self.max_position_embeddings:
            raise ValueError(f"positions up to {offset + seqlen - 1} exceed max_position_embeddings="
                             f"{self.max_position_embeddings}: raise max_position_embeddings or shorten the input")

        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pos = torch.arange(offset, offset + seqlen, device=x.device)
        if self.rope:
            cos, sin = self._rope_table(offset, offset + seqlen, x.device)  # [seqlen, rotary_dim / 2]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, l, head_dim]

        if state is None:
            k_all, v_all, k_pos, q_doc, k_doc = k, v, q_pos, seq_idx, seq_idx
        else:
            q_doc = seq_idx
            if seq_idx is None:
                last = state.seq_idx[:, state.length - 1:state.length] if state.length else None
                q_doc = (last if last is not None else torch.zeros(batch, 1, dtype=torch.int32, device=x.device))
                q_doc = q_doc.expand(batch, seqlen)
            state.has_documents |= seq_idx is not None
            keep = self.window - 1 if self.window is not None else None
            state.append(k.to(state.k.dtype), v.to(state.v.dtype), q_doc.to(torch.int32), keep)
            k_all, v_all, k_doc = state.valid()
            k_pos = torch.arange(state.key_start, state.seqlen_offset, device=x.device)
            if not state.has_documents:
                q_doc = k_doc = None
            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)

        out = self._attend(q, k_all, v_all, q_pos, k_pos, q_doc, k_doc)  # [b, n_heads, l, head_dim]
        if state is not None and self.window is not None:
            state.trim(self.window - 1)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.n_heads * self.head_dim))

    def _forward_static(self, x: torch.Tensor, state: KVCache) -> torch.Tensor:
        """Continue a static cache: positions come from state.position on the device, the new keys are
        written there, and the queries attend over the whole buffer, masked to their causal window."""
        batch, seqlen, _ = x.shape
        capacity = state.k.shape[2]
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pos = state.position + torch.arange(seqlen, device=x.device)          # [seqlen]
        if self.rope:
            cos, sin = self._rope_table(0, capacity, x.device)
            cos, sin = cos[q_pos], sin[q_pos]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [b, heads, l, head_dim]
        state.k.index_copy_(2, q_pos, k.to(state.k.dtype))
        state.v.index_copy_(2, q_pos, v.to(state.v.dtype))
        state.position.add_(seqlen)
        mask = attention_mask(q_pos, torch.arange(capacity, device=x.device), True, self.window)
        k_all, v_all = state.k.to(q.dtype), state.v.to(q.dtype)
        if self.backend == "math":
            out = math_attention(q, k_all, v_all, mask, self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.softmax_scale,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, self.n_heads * self.head_dim))

    def _attend(self, q, k, v, q_pos, k_pos, q_doc, k_doc) -> torch.Tensor:
        """q: [b, n_heads, lq, head_dim]; k, v: [b, n_kv_heads, lk, head_dim] -> [b, n_heads, lq, head_dim]."""
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
        # The newest query and the newest key are the same token, so the causal mask is aligned to the
        # bottom-right corner; windows and documents need the explicit positions unless a single query
        # already sees every cached key.
        needs_mask = q_doc is not None or (
            self.window is not None and not (seqlen_q == 1 and seqlen_k <= self.window))
        if self.backend == "flash_attn" and q_doc is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func  # [b, l, heads, head_dim] layout, GQA native
            window = (self.window - 1, 0) if self.window is not None else (-1, -1)
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  softmax_scale=self.softmax_scale, causal=self.causal, window_size=window)
            return out.transpose(1, 2)
        is_causal = False
        if needs_mask or (self.causal and seqlen_q > 1 and (seqlen_q != seqlen_k or self.backend == "math")):
            mask = attention_mask(q_pos, k_pos, self.causal, self.window, q_doc, k_doc)
        else:
            # No mask at all (bidirectional, or one query that sees the whole cache), or plain causal
            # with as many queries as keys: SDPA's is_causal (top-left aligned) is then right and lets
            # it pick FlashAttention-2 / cuDNN.
            mask, is_causal = None, self.causal and seqlen_q > 1
        if self.backend == "math":
            return math_attention(q, k, v, mask, self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=self.softmax_scale,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def extra_repr(self) -> str:
        extras = [f"d_model={self.d_model}", f"n_heads={self.n_heads}", f"n_kv_heads={self.n_kv_heads}",
                  f"head_dim={self.head_dim}", f"causal={self.causal}", f"backend={self.backend!r}"]
        if self.rope:
            extras.append(f"rope_theta={self.rope_theta}, rotary_dim={self.rotary_dim}")
        if self.window is not None:
            extras.append(f"window={self.window}")
        return ", ".join(extras)
