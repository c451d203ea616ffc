"""Recurrent generation: one prefill pass over the prompt, then token-by-token decode that carries
the model's inference state (SSM + conv states, KV caches), never re-reading the prompt.

    from zoo.checkpoint import from_pretrained
    from zoo.generate import generate
    model = from_pretrained("runs/byte-lm")
    out = generate(model, torch.tensor([[72, 105]]), max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)

Prompts of different lengths in one batch: the shared prefix (the shortest prompt's length) is
prefilled at once; longer prompts then feed their remaining prompt tokens through the decode steps
in place of samples, so every row continues from exactly its own prompt.

On CUDA the decode steps replay one CUDA graph of the whole model (CUDAGraphDecoder) when the model
allows it (Mamba, Mamba-2, attention with a static KV cache, MLP; not MoE): `cuda_graph=` / `zoo
generate --cuda-graph` choose.
"""
from __future__ import annotations

import codecs
import dataclasses
import warnings
from typing import Callable, Sequence

import torch


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [b, vocab] -> [b] int64.

    temperature 0 is greedy (argmax); top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the
    smallest set whose probability reaches top_p (nucleus sampling; the most likely token is always kept).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 disables top-k filtering)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 disables nucleus filtering)")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- CUDA-graph decode

def cuda_graph_unsupported(model: torch.nn.Module) -> str | None:
    """Why one decode step of `model` cannot be captured in a CUDA graph, or None when it can.

    A graph replays the kernels of one captured step with every shape, slice and pointer fixed:
    the step must run no host-side logic that changes between tokens and never wait for the GPU.
    Mamba, Mamba-2, MLP layers and norms qualify (their states are fixed-size and updated in place),
    and attention with a static KV cache (KVCache.to_static: the position lives on the device).
    """
    from layers.moe import MoE

    param = next(model.parameters())
    if param.device.type != "cuda":
        return f"the model is on {param.device.type}; CUDA graphs need it on a CUDA device"
    for module in model.modules():
        if isinstance(module, MoE):
            return ("it has MoE layers, which read their per-expert token counts on the host every step "
                    "(a device-to-host sync, which a graph cannot hold)")
    return None


def make_static(state) -> None:
    """Switch every attention KV cache in an inference state to its static form (KVCache.to_static),
    the form a CUDA graph can replay; SSM and conv states are static already."""
    from layers.attention import KVCache

    if isinstance(state, KVCache):
        state.to_static()
    elif isinstance(state, (list, tuple)):
        for s in state:
            make_static(s)


def _state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of an inference state (lists of per-layer dataclasses, None for stateless layers)."""
    if state is None:
        return []
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, (list, tuple)):
        return [t for s in state for t in _state_tensors(s)]
    if dataclasses.is_dataclass(state):
        return [t for f in dataclasses.fields(state) for t in _state_tensors(getattr(state, f.name))]
    return []


class CUDAGraphDecoder:
    """One decode step of the whole model (every layer, the final norm and the head) captured in a
    CUDA graph and replayed per token: one launch instead of hundreds, so small batches run at the
    GPU's speed instead of the host's.

        step = CUDAGraphDecoder(model, state)     # after the prefill filled `state`
        logits = step(tokens)                     # tokens [batch] int64 -> logits [batch, vocab]

    The graph's static buffers are the token input, the logits output (overwritten by the next call:
    use or copy them first) and `state` itself, whose SSM and conv states every replay updates in
    place, exactly as an eager `model(tokens[:, None], state=state)` would (attention caches are made
    static first: they need init_state's max_seqlen). Capturing runs a few warm-up steps (kernel
    compilation, allocator, cuBLAS workspaces); the state is restored after them, so the decoder
    starts from the state it was given.
    """

    def __init__(self, model: torch.nn.Module, state: list, *, warmup: int = 2):
        reason = cuda_graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"cuda_graph: this model cannot decode through a CUDA graph: {reason}")
        make_static(state)
        device = next(model.parameters()).device
        batch = _state_tensors(state)[0].shape[0]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        saved = [t.clone() for t in _state_tensors(state)]
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):          # capture wants its warm-up off the default stream
                for _ in range(warmup):
                    model(self.tokens, state=state)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.tokens, state=state).logits[:, -1]        # [b, vocab]
        finally:
            for t, s in zip(_state_tensors(state), saved):
                t.copy_(s)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits


def _use_cuda_graph(model: torch.nn.Module, cuda_graph: bool | None) -> bool:
    """None (auto): a graph when the model supports one (on CUDA, no MoE); True: a graph or
    a ValueError saying why not; False: eager decode."""
    if cuda_graph is False:
        return False
    reason = cuda_graph_unsupported(model)
    if reason is None:
        return True
    if cuda_graph:
        raise ValueError(f"cuda_graph=True: this model cannot decode through a CUDA graph: {reason}; "
                         f"pass cuda_graph=None (auto) or False for eager decode")
    return False


# ---------------------------------------------------------------- generation

@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | None = None,
             on_token: Callable[[torch.Tensor, list[bool]], None] | None = None,
             cuda_graph: bool | None = None) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by `max_new_tokens` tokens with the model's recurrent state.

    input_ids: int64 [b, l] (equal lengths), or a list of b token lists (any lengths >= 1).
    on_token(tokens [b], emitted [b] bools): called at every decode step with the tokens chosen
        and which rows produced a new one (rows still inside their prompt, or finished, did not):
        streaming output.
    eos_token_id: a row that produces it stops (its later tokens are eos).
    cuda_graph: decode steps replay one CUDA graph of the whole model (CUDAGraphDecoder). None
        (default): when the model supports it (on CUDA, no MoE layers), else eager; True: required
        (ValueError on CPU or for a model that cannot); False: eager. The tokens are the same either
        way: after the prefill the attention caches become static (KVCache.to_static) in both, and
        the graph replays the eager step's kernels.
    Returns [b, l + max_new_tokens] for a tensor input, else each row's prompt + new tokens as lists.

    Without on_token and eos_token_id the loop never waits for the GPU: the chosen tokens are read
    back once at the end.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    param = next(model.parameters())
    device = param.device
    as_tensor = torch.is_tensor(input_ids)
    rows = [list(map(int, r)) for r in (input_ids.tolist() if as_tensor else input_ids)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (the first prediction is made from it)")
    vocab = model.config.get("vocab_size") if isinstance(getattr(model, "config", None), dict) else None
    if vocab is not None and any(not 0 <= t < vocab for r in rows for t in r):
        raise ValueError(f"prompt token ids must be in [0, vocab_size={vocab})")
    use_graph = _use_cuda_graph(model, cuda_graph)
    lengths = [len(r) for r in rows]
    batch, shortest = len(rows), min(lengths)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()

    # state in the model's float dtype; floating-point state stays fp32 where layers ask for it
    total_steps = max(lengths) - shortest + max_new_tokens
    state = model.init_state(batch, dtype=param.dtype, device=device, max_seqlen=max(lengths) + max_new_tokens)
    prefix = torch.tensor([r[:shortest] for r in rows], dtype=torch.long, device=device)
    logits = model(prefix, state=state).logits[:, -1]                   # [b, vocab]
    make_static(state)                               # decode steps of fixed shapes, graph or not
    def step(tokens):
        return model(tokens[:, None], state=state).logits[:, -1]

    if use_graph and total_steps > 1:                # the first token comes from the prefill's logits
        try:
            step = CUDAGraphDecoder(model, state)
        except RuntimeError as exc:                  # auto mode: a capture that fails decodes eagerly
            if cuda_graph:
                raise
            warnings.warn(f"CUDA-graph capture failed, decoding eagerly: {exc}", RuntimeWarning, stacklevel=2)

    out = [list(r) for r in rows]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    done_rows = [False] * batch                      # host copy of `done` (read only with eos)
    new_counts = [0] * batch
    chosen: list[tuple[torch.Tensor, list[bool]]] = []   # per step: tokens [b] (on device), emitted
    pos = shortest                                   # position of the token chosen next
    for _ in range(total_steps):
        sampled = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        forced = [pos < n for n in lengths]
        if any(forced):
            prompt_tok = torch.tensor([rows[i][pos] if forced[i] else 0 for i in range(batch)], device=device)
            sampled = torch.where(torch.tensor(forced, device=device), prompt_tok, sampled)
        if eos_token_id is not None:
            sampled = torch.where(done, torch.full_like(sampled, eos_token_id), sampled)
        emitted = [not forced[i] and new_counts[i] < max_new_tokens and not done_rows[i] for i in range(batch)]
        for i in range(batch):
            new_counts[i] += emitted[i]
        chosen.append((sampled, emitted))
        if on_token is not None and any(emitted):
            on_token(sampled, emitted)
        if eos_token_id is not None:
            done |= (sampled == eos_token_id) & ~torch.tensor(forced, device=device)
            done_rows = done.tolist()
            if all(done_rows):
                break
        pos += 1
        if all(c >= max_new_tokens or d for c, d in zip(new_counts, done_rows)) and pos >= max(lengths):
            break
        logits = step(sampled)
    if chosen:                                       # one device-to-host copy of every chosen token
        tokens = torch.stack([s for s, _ in chosen]).tolist()           # [steps][b]
        for step_tokens, (_, emitted) in zip(tokens, chosen):
            for i in range(batch):
                if emitted[i]:
                    out[i].append(step_tokens[i])
    if eos_token_id is not None:                     # rows that stopped early: pad with eos
        for r, n in zip(out, lengths):
            r.extend([eos_token_id] * (n + max_new_tokens - len(r)))
    if was_training:
        model.train()
    if as_tensor:
        return torch.tensor(out, dtype=torch.long)
    return out


# ---------------------------------------------------------------- text <-> ids

def is_byte_model(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "config", None), dict) and model.config.get("vocab_size") == 256


def encode_prompt(text: str, byte_level: bool) -> list[int]:
    """Byte models: the UTF-8 bytes of the text; token models: space-separated integer ids."""
    if byte_level:
        return list(text.encode("utf-8"))
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        raise ValueError(f"--prompt {text!r}: this model has a token vocabulary (not bytes), so a prompt "
                         f"is space-separated token ids, e.g. --prompt '1 17 42'") from None


class ByteStream:
    """Incremental UTF-8 decoding of byte tokens; undecodable bytes become U+FFFD."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def decode_tokens(tokens: Sequence[int], byte_level: bool) -> str:
    if byte_level:
        return bytes(tokens).decode("utf-8", errors="replace")
    return " ".join(str(t) for t in tokens)
