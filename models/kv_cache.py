"""A key/value cache for decoding: the prompt is prefilled once, then one token per step.

Every layer's keys and values for `batch` sequences of up to `max_len`
tokens are preallocated, shape (batch, max_len, kv_heads, head_dim) per
layer. Under tensor parallelism a rank's column-parallel wk and wv produce
only its own kv heads, so the cache is made with the local count
(kv_heads / tp): it is sharded over tp exactly as the attention heads are,
and never communicates.

Batches are left-padded: row r's prompt fills slots pad[r].. of its buffer
and every row's next token goes to the same slot. A token's rotary position
is its slot minus pad[r], so a prompt sees the positions it would see alone;
a key is visible to a query when it is neither padding nor in the future.
A padding query sees only itself, so its (unused) output stays finite.

`at(slots, window)` says which slots this forward writes. With window=None
attention reads the whole buffer under a mask, so every decode step has the
same shapes (what torch.compile and CUDA graphs replay); an eager step passes
the current length and reads only that much.
"""

from typing import Optional

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.keys = torch.arange(max_len, device=device)
        self.slots = self.keys[:1]
        self.window: Optional[int] = None
        self._mask = None

    def reset(self, pad) -> None:
        """A new batch: `pad[r]` padding slots before row r's prompt. Old entries are masked, not cleared."""
        self.pad.copy_(torch.as_tensor(pad, dtype=torch.long))

    def at(self, slots: torch.Tensor, window: Optional[int] = None) -> "KVCache":
        """This forward's tokens go to `slots` (a 1-D tensor); attention reads slots [0, window), or all."""
        self.slots, self.window = slots, window
        self._mask = None
        return self

    def positions(self) -> torch.Tensor:
        """(batch, seq): each token's rotary position, its distance from its row's first prompt token."""
        return (self.slots[None, :] - self.pad[:, None]).clamp_min(0)

    def rope(self, table: torch.Tensor) -> torch.Tensor:
        """The rotary table (max_seq_len, head_dim // 2, 2) at this forward's positions: (batch, seq, ., 2)."""
        return table[self.positions()]

    def mask(self) -> torch.Tensor:
        """(batch, 1, seq, keys) bool, True where a query may attend."""
        if self._mask is None:
            keys = self.keys if self.window is None else self.keys[: self.window]
            query = self.slots[None, :, None]
            own = (keys[None, None, :] >= self.pad[:, None, None]) & (keys[None, None, :] <= query)
            self._mask = (own | (keys[None, None, :] == query))[:, None]
        return self._mask

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)


class LayerCache:
    """One layer's view of the cache: what Attention talks to."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's k, v (batch, seq, kv_heads, head_dim); return all visible keys, values and the mask."""
        c = self.cache
        ks, vs = c.k[self.index], c.v[self.index]
        ks.index_copy_(1, c.slots, k.to(ks.dtype))
        vs.index_copy_(1, c.slots, v.to(vs.dtype))
        if c.window is not None:
            ks, vs = ks[:, : c.window], vs[:, : c.window]
        return ks, vs, c.mask()
