"""Recurrent generation: one prefill pass over the prompt, then token-by-token decode that carries
the model's inference state (SSM + conv states, KV caches), never re-reading the prompt.

    from zoo.checkpoint import from_pretrained
    from zoo.generate import generate
    model = from_pretrained("runs/byte-lm")
    out = generate(model, torch.tensor([[72, 105]]), max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)

Prompts of different lengths in one batch: the shared prefix (the shortest prompt's length) is
prefilled at once; longer prompts then feed their remaining prompt tokens through the decode steps
in place of samples, so every row continues from exactly its own prompt.
"""
from __future__ import annotations

import codecs
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


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | None = None,
             on_token: Callable[[torch.Tensor, list[bool]], None] | None = None) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by `max_new_tokens` tokens with the model's recurrent state.

    input_ids: int64 [b, l] (equal lengths), or a list of b token lists (any lengths >= 1).
    on_token(tokens [b], emitted [b] bools): called at every decode step with the tokens chosen
        and which rows produced a new one (rows still inside their prompt, or finished, did not):
        streaming output.
    eos_token_id: a row that produces it stops (its later tokens are eos).
    Returns [b, l + max_new_tokens] for a tensor input, else each row's prompt + new tokens as lists.
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
    lengths = [len(r) for r in rows]
    batch, shortest = len(rows), min(lengths)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()

    # state in the model's float dtype; floating-point state stays fp32 where layers ask for it
    state = model.init_state(batch, dtype=param.dtype, device=device)
    prefix = torch.tensor([r[:shortest] for r in rows], dtype=torch.long, device=device)
    logits = model(prefix, state=state).logits[:, -1]                   # [b, vocab]

    out = [list(r) for r in rows]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_counts = [0] * batch
    pos = shortest                                   # position of the token chosen next
    total_steps = max(lengths) - shortest + max_new_tokens
    for _ in range(total_steps):
        sampled = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        forced = [pos < n for n in lengths]
        if any(forced):
            prompt_tok = torch.tensor([rows[i][pos] if forced[i] else 0 for i in range(batch)], device=device)
            sampled = torch.where(torch.tensor(forced, device=device), prompt_tok, sampled)
        if eos_token_id is not None:
            sampled = torch.where(done, torch.full_like(sampled, eos_token_id), sampled)
        emitted = [not forced[i] and new_counts[i] < max_new_tokens and not bool(done[i]) for i in range(batch)]
        for i in range(batch):
            if emitted[i]:
                out[i].append(int(sampled[i]))
                new_counts[i] += 1
        if on_token is not None and any(emitted):
            on_token(sampled, emitted)
        if eos_token_id is not None:
            done |= (sampled == eos_token_id) & ~torch.tensor(forced, device=device)
            if bool(done.all()):
                break
        pos += 1
        if all(c >= max_new_tokens or bool(d) for c, d in zip(new_counts, done)) and pos >= max(lengths):
            break
        logits = model(sampled[:, None], state=state).logits[:, -1]
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
