"""Decoder-only language model (GPT): predicts the next token from the tokens before it.

    tokens (B, T) -> token embeddings + positions -> causal blocks -> final norm -> logits (B, T, V)

The causal mask lets position t attend to positions <= t only, so one forward pass trains all T next-token
predictions at once. The output head shares its weights with the token embedding (weight tying): the same
matrix maps tokens to vectors and vectors back to token scores, which saves V x D parameters. The linear
layers have no biases (as in LLaMA): the layer norms learn the shifts, and a bias costs a pass over memory.

A VLM feeds this model image tokens before the text: `hidden(embeds)` takes any sequence of D-wide
vectors, `embed(tokens)` and `head(hidden)` are the two ends. A VLM that joins the image by cross-attention
(nanovlm/cross_attention.py) instead passes `hidden` a function that runs before each block and may add the
image to the residual stream there.

Generation uses a KV cache: keys and values of past positions are kept, so each new token costs one
position's work instead of re-running the whole sequence. The cache advances its own position; `hidden`
only reads it, to know which position embeddings come next.

This file imports only torch and einops, so it can be copied alone into another project; nanovlm/attention.py
explains the attention it uses in detail, and holds the same KVCache and the same self-attention, line for line.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class DecoderConfig:
    vocab_size: int = 1024  # number of token ids (BPE ranks + special tokens)
    max_seq_len: int = 128  # longest sequence (image tokens + text) the position table covers
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads per block (dim must divide by it)
    mlp_ratio: int = 4  # hidden width of each MLP is mlp_ratio * dim

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoder {name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True where a query may look at a key.

    The queries are the last n_queries positions of the n_keys-long sequence (with a KV cache the keys
    include everything generated so far), so query i sits at position n_keys - n_queries + i.
    """
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos


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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before it."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.layer = layer  # which layer's slot of a shared KVCache this module writes
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # queries, keys and values of all heads in one matmul
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)  # mixes the heads' outputs back into the residual stream
        self.keep_weights = False  # set True to store attention weights (for pictures); slower
        self.weights: torch.Tensor | None = None  # (B, nh, T, T_past + T) when keep_weights

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); with a cache, x holds only the positions after the cached ones."""
        # split the channels into queries, keys and values, each into heads: (B, nh, T, hs) each
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs): every position so far
        T, S = q.size(2), k.size(2)
        # Without cached positions (T == S) the kernel applies the causal mask itself and skips what it hides
        # (flash attention takes no explicit mask); one new token may see every key, so it needs no mask either.
        mask = None if T in (1, S) else causal_mask(T, S, x.device)
        if self.keep_weights:
            y = self._attention_with_weights(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T == S)  # (B, nh, T, hs)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # the heads side by side again, then mixed

    def _attention_with_weights(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention written out (attention.py's attention_math), keeping the weights in self.weights."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        mask = causal_mask(q.size(2), k.size(2), q.device)
        self.weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return self.weights @ v


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, narrow."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block with causal attention."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    """GPT-style decoder: embed tokens, add positions, causal blocks, tied output head."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_embed.weight  # weight tying

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) vectors (positions are added later, in hidden)."""
        return self.tok_embed(tokens)

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None, before_block=None) -> torch.Tensor:
        """Run the blocks over (B, T, D) inputs; with a cache they continue after its cache.pos positions.

        before_block(i, x) -> x, if given, runs on the residual stream before block i.
        """
        start = cache.pos if cache is not None else 0  # read only: the cache moves pos on as the last block writes
        if start + x.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + x.size(1)} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        x = x + self.pos_embed(torch.arange(start, start + x.size(1), device=x.device))
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, cache)
        return self.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final hidden states -> (B, T, V) next-token logits."""
        return self.lm_head(h)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Text-only language model: (B, T) token ids -> (B, T, V) logits."""
        return self.head(self.hidden(self.embed(tokens), cache))
