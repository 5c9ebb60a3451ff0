"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k and top-p.

Sampling draws one exponential variate per vocabulary entry and takes
argmax(p / noise), which picks token i with probability p_i (the
exponential-race form of sampling, as gpt-fast does). Each prompt draws from
its own generator, seeded from (seed, the prompt's index), so its text does
not depend on which prompts share its batch, nor on the tp degree: every
tp rank holds the same gathered logits and the same generators, so every
rank picks the same token without communicating.
"""

import hashlib
from typing import Optional, Sequence

import torch


def prompt_generator(seed: int, index: int, device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(batch, vocab) fp32 logits scaled by 1/temperature, everything outside top-k and top-p set to -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids. temperature 0: argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    noise = torch.stack([torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=g)
                         for g in generators])
    return (probs / noise).argmax(-1)
