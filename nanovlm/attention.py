"""Multi-head attention, the one operation every transformer is built on.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V

Each of the h heads looks at the sequence through its own d_head = d / h slice of the queries, keys and
values; the heads' outputs are concatenated and mixed by an output projection.

This file computes attention two ways that give the same numbers:
- `attention_math`: the formula above, line by line, for reading and for pictures of the weights;
- `attention_sdpa`: `F.scaled_dot_product_attention`, one fused call (flash attention on a GPU).

It also has the two masks a VLM needs (causal: no peeking at later tokens; padding: no attending to
pad tokens) and a KV cache for generating one token at a time.

`vit.py` and `decoder.py` carry their own short copies of self-attention so that each file can be copied
alone into another project; `tests/test_attention.py` checks that all three compute the same function.
This file imports only torch and the standard library.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """Keys and values of the tokens seen so far, one pair per layer, grown as tokens are generated.

    Without a cache, generating token t recomputes keys and values for all t previous tokens; with it,
    each step computes them for the one new token only.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's (B, nh, T, hs) keys/values for a layer; return all of them so far."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def __len__(self) -> int:
        """Number of positions cached (the same in every layer)."""
        return next(iter(self.keys.values())).size(2) if self.keys else 0


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with optional causal and padding masks and a KV cache (no biases, as in vit.py)."""

    def __init__(self, dim: int, n_heads: int, layer: int = 0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.layer = layer  # which slot of a shared KVCache this module uses
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
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # split the channels into heads: (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # (B, nh, T_past + T, hs)
        mask = self._mask(T, k.size(2), causal, lengths, x.device)
        if use_sdpa:
            y = attention_sdpa(q, k, v, mask)
        else:
            y, _ = attention_math(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads again
        return self.proj(y)

    @staticmethod
    def _mask(n_queries, n_keys, causal, lengths, device) -> torch.Tensor | None:
        """Combine the causal and padding masks into one broadcastable boolean mask (or None)."""
        mask = causal_mask(n_queries, n_keys, device) if causal else None
        if lengths is not None:
            pad = padding_mask(lengths, n_keys)  # (B, 1, 1, Tk)
            mask = pad if mask is None else pad & mask
        return mask
