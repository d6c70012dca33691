"""Multi-head attention, the one operation every transformer is built on.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V

Each of the h heads looks at the sequence through its own d_head = d / h slice of the queries, keys and
values; the heads' outputs are concatenated and mixed by an output projection.

This file computes attention two ways that give the same numbers:
- `attention_math`: the formula above, line by line, for reading and for pictures of the weights;
- `attention_sdpa`: `F.scaled_dot_product_attention`, one fused call (flash attention on a GPU), the call
  `MultiHeadAttention` makes.

It also has the two masks a VLM needs (causal: no peeking at later tokens; padding: no attending to
pad tokens) and the KV cache the decoder generates with, one token at a time.

`vit.py` and `decoder.py` carry their own short copies of self-attention (written the same way, line for
line) and `decoder.py` an identical copy of `KVCache`, so that each file can be copied alone into another
project; `tests/test_attention.py` checks that the three compute the same function and that the two caches
are the same code. This file imports only torch, einops and the standard library.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True where a query may look at a key.

    The queries are the last n_queries positions of the n_keys-long sequence (with a KV cache the keys
    include everything generated so far), so query i sits at position n_keys - n_queries + i.
    """
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos


def padding_mask(lengths: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Boolean (B, 1, 1, n_keys) mask, True on the first lengths[b] keys of each sequence."""
    k_pos = torch.arange(n_keys, device=lengths.device)
    return (k_pos[None, :] < lengths[:, None])[:, None, None, :]


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: returns the output (B, nh, Tq, hs) and the weights (B, nh, Tq, Tk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # each row sums to 1 over the keys it may see
    return weights @ v, weights


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention through PyTorch's fused kernel (no weights returned)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions and filled left to right.

    Without a cache, generating token t recomputes keys and values for all t tokens before it; with one,
    each step computes them for its new tokens only and reads the rest from here. In one forward pass every
    layer calls update(layer, k, v) once, in order; the cache owns its position `pos`: all layers write at
    pos, and the last layer's write moves pos on, so the model reads pos (for its position embeddings) and
    never sets it. attention.py and decoder.py carry identical copies of this class, so each file copies alone.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers = n_layers
        self.max_len = max_len  # longest sequence the cache can hold
        self.k: list[torch.Tensor | None] = [None] * n_layers  # (B, nh, max_len, hs) per layer, once written
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0  # number of positions cached in every layer: where the next keys and values go

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's (B, nh, T, hs) keys/values at pos; return all of them so far, (B, nh, pos + T, hs)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} does not exist: this cache has n_layers = {self.n_layers}")
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the cache's max_len {self.max_len}")
        if self.k[layer] is None:  # allocate on first use, in the shape, dtype and device the model computes in
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if layer == self.n_layers - 1:  # every layer has written this pass: the next one starts after it
            self.pos = end
        return keys, values


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with optional causal and padding masks and a KV cache (no biases, as in vit.py)."""

    def __init__(self, dim: int, n_heads: int, layer: int = 0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.layer = layer  # which layer's slot of a shared KVCache this module writes
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # queries, keys and values of all heads in one matmul
        self.proj = nn.Linear(dim, dim, bias=False)  # mixes the heads' outputs back into the residual stream

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_sdpa: bool = True,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). lengths: (B,) number of real (unpadded) tokens per sequence."""
        # split the channels into queries, keys and values, each into heads: (B, nh, T, hs) each
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs): every position so far
        mask = self._mask(q.size(2), k.size(2), causal, lengths, x.device)
        if use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        else:
            y, _ = attention_math(q, k, v, mask)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # the heads side by side again, then mixed

    @staticmethod
    def _mask(n_queries, n_keys, causal, lengths, device) -> torch.Tensor | None:
        """Combine the causal and padding masks into one broadcastable boolean mask (or None)."""
        mask = causal_mask(n_queries, n_keys, device) if causal else None
        if lengths is not None:
            pad = padding_mask(lengths, n_keys)  # (B, 1, 1, Tk)
            mask = pad if mask is None else pad & mask
        return mask
