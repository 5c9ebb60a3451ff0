"""A Llama-3-style decoder in plain single-device PyTorch.

RMSNorm, rotary position embeddings (Meta's interleaved pair layout),
grouped-query attention and a SwiGLU MLP. Field names follow Meta's
`ModelArgs`. Nothing here knows about parallelism: `parallel/` splits this
module from the outside. The layers live in a ModuleDict keyed by their index
so that a pipeline stage can drop the ones it does not own and every
parameter keeps its name.
"""

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1's long-context rotary scaling, as in a HF config.json: {factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings}; None = plain RoPE.
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    # Rows of the embedding and output projection; more than vocab_size when a
    # parallel split needs a multiple. The extra ids never occur in the data.
    padded_vocab_size: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "ModelArgs":
        """Take the fields of ModelArgs from a config node (extra keys, like name, are ignored)."""
        values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = dict(values["rope_scaling"])  # a plain dict, not a config node
        return cls(**values)

    @property
    def vocab_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def llama3_scaled(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's rotary scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_context / low, freqs / factor, freqs)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_table(head_dim: int, max_seq_len: int, theta: float, device=None, scaling: Optional[dict] = None) -> torch.Tensor:
    """cos and sin of every (position, frequency), stacked: shape (max_seq_len, head_dim // 2, 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        freqs = llama3_scaled(freqs, scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate each (2i, 2i+1) pair of x (batch, seq, heads, head_dim) by its position's angle.

    table: the whole rotary table (positions 0, 1, ... are taken), or one row
    of angles per token, (batch, seq, head_dim // 2, 2), when decoding.
    """
    bsz, seq = x.shape[:2]
    if table.dim() == 4:
        cos, sin = table[..., 0].unsqueeze(2), table[..., 1].unsqueeze(2)
    else:
        cos = table[:seq, :, 0].view(1, seq, 1, -1)
        sin = table[:seq, :, 1].view(1, seq, 1, -1)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cache: this layer's KV cache when decoding (models/kv_cache.py), else None.
        mask: None for plain causal attention, else (batch, 1, seq, keys) bool, True where a query may attend
        (document masking in training; a cache brings its own)."""
        bsz, seq, _ = x.shape
        # -1 rather than the head counts: under tensor parallelism a rank holds a
        # slice of the heads, and the same code must work on it unchanged.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if getattr(cache, "attend", None) is not None:
            # A cache that computes the attention itself, from this rank's part of the sequence (context
            # parallelism's, parallel/context_parallel.py): (batch, seq, heads, head_dim).
            return self.wo(cache.attend(q, k, v).reshape(bsz, seq, -1))
        if cache is not None:  # decoding: these keys and values join the cached ones
            k, v, mask = cache.update(k, v)
        repeat = q.shape[2] // k.shape[2]
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=2)
            v = v.repeat_interleave(repeat, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Every argument positional: the TP plan prepares the attention's inputs by position.
        h = x + self.attention(self.attention_norm(x), rope, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_rows, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_rows, bias=False)
        self.tie_weights()
        self.register_buffer(
            "rope", rope_table(args.head_dim, args.max_seq_len, args.rope_theta, scaling=args.rope_scaling),
            persistent=False
        )
        # With targets, the logits are made and reduced in this many token chunks (1: all at once).
        self.loss_chunks = 1

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *, cache=None,
                last_only: bool = False, doc_ids: Optional[torch.Tensor] = None,
                num_targets: Optional[float] = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); with targets (batch, seq), the mean cross-entropy
        over the targets that are not IGNORE (-100).

        cache: a KVCache (models/kv_cache.py) placed at these tokens' slots, when
        decoding. last_only: the logits of the last position only (batch, 1, vocab).
        doc_ids (batch, seq), in training: the document of each token; a token then attends only
        to earlier tokens of its own document. (Rotary embeddings depend on relative positions
        only, so each document is computed as if it stood alone.) A pipeline stage gets hidden
        states as `tokens` and the same doc_ids.
        num_targets: what the summed loss is divided by, where these targets are part of a larger
        batch whose mean is wanted (a sequence split over ranks); None: the targets here not IGNORE.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope = self.rope if cache is None else cache.rope(self.rope)
        mask = document_mask(doc_ids) if doc_ids is not None else None
        for key, layer in self.layers.items():
            h = layer(h, rope, None if cache is None else cache.layer(int(key)), mask)
        h = h[:, -1:] if last_only else h
        h = self.norm(h) if self.norm is not None else h
        if self.output is None:
            return h
        if targets is None:
            return self.output(h)
        return cross_entropy(self.output, h, targets, self.loss_chunks, num_targets)

    def tie_weights(self) -> None:
        """With tie_embeddings, make the output projection use the embedding's tensor.

        Call again after `to_empty`: it gives each module its own new tensor, which
        silently unties them (a tied model built on the meta device would otherwise
        train a second, separately initialised output matrix).
        """
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def reset_buffers(self) -> None:
        """Recompute the rotary table (after `to_empty` from the meta device)."""
        self.rope = rope_table(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=self.rope.device,
            scaling=self.args.rope_scaling,
        )


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) bool: query i may attend key j iff j <= i and both are in one document."""
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1) & causal


def token_loss(logits: torch.Tensor, targets: torch.Tensor, num_targets: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy of logits (batch, seq, vocab) against targets in fp32: the mean over the targets not
    IGNORE, or their sum divided by num_targets where given."""
    if num_targets is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / num_targets


def _loss_sum(output: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output(h).float(), targets, reduction="sum")


def cross_entropy(output: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunks: int = 1,
                  num_targets: Optional[float] = None) -> torch.Tensor:
    """Mean cross-entropy of output(h) against targets, with fp32 log-probabilities.

    num_targets: divide the summed loss by this rather than by the targets not ignored here.

    chunks > 1: the tokens are split into `chunks` pieces whose logits are made,
    reduced and thrown away one at a time, and made again in backward
    (activation checkpointing of the output projection and the loss), so the
    (tokens, vocab) fp32 logits and their gradient are never whole: at a 128k
    vocabulary they are the largest tensors of a step. The same numbers as one
    piece up to the order of the final sum; one more output projection in
    backward (2 * tokens * dim * vocab FLOPs).
    """
    if chunks <= 1:
        return token_loss(output(h), targets, num_targets)
    total = sum(checkpoint(_loss_sum, output, hc, yc, use_reentrant=False)
                for hc, yc in zip(h.flatten(0, 1).chunk(chunks), targets.flatten().chunk(chunks)))
    # F.cross_entropy's mean: over the targets not ignored.
    return total / (num_targets if num_targets is not None else (targets != -100).sum())


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameters of the whole (unsharded) model; shared tensors counted once."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embedding and name.startswith("tok_embeddings")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter, independent of layout and process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_std(name: str, args: ModelArgs) -> Optional[float]:
    """The init rule: normal(0, 0.02); residual-branch outputs scaled by 1/sqrt(2L); norms are ones (None)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 0.02 / math.sqrt(2 * args.n_layers)
    return 0.02


def full_init_value(name: str, shape, args: ModelArgs, seed: int, device) -> torch.Tensor:
    """The full, unsharded initial value of one parameter: a function of (seed, name) alone."""
    std = init_std(name, args)
    if std is None:
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    return torch.randn(shape, generator=gen, device=device) * std
