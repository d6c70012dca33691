"""Decoder-only language model (GPT): predicts the next token from the tokens before it.

    tokens (B, T) -> token embeddings + positions -> causal blocks -> final norm -> logits (B, T, V)

The causal mask lets position t attend to positions <= t only, so one forward pass trains all T next-token
predictions at once. The output head shares its weights with the token embedding (weight tying): the same
matrix maps tokens to vectors and vectors back to token scores, which saves V x D parameters. The linear
layers have no biases (as in LLaMA): the layer norms learn the shifts, and a bias costs a pass over memory.

A VLM feeds this model image tokens before the text: `hidden(embeds)` takes any sequence of D-wide
vectors, `embed(tokens)` and `head(hidden)` are the two ends.

Generation uses a KV cache: keys and values of past positions are kept, so each new token costs one
position's work instead of re-running the whole sequence.

This file imports only torch, so it can be copied alone into another project; nanovlm/attention.py
explains the attention it uses in detail.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DecoderConfig:
    vocab_size: int = 1024  # number of token ids (BPE ranks + special tokens)
    max_seq_len: int = 128  # longest sequence (image tokens + text) the position table covers
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads per block (dim must divide by it)
    mlp_ratio: int = 4  # hidden width of each MLP is mlp_ratio * dim

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


class KVCache:
    """Preallocated keys and values for every layer, filled left to right as tokens are decoded."""

    def __init__(self, cfg: DecoderConfig, batch_size: int) -> None:
        self.shape = (batch_size, cfg.n_heads, cfg.max_seq_len, cfg.dim // cfg.n_heads)
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.pos = 0  # number of positions already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nh, T, hs) keys/values at self.pos; return everything cached so far."""
        if self.k[layer] is None:  # allocate on first use, in the dtype the model computes in
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        end = self.pos + k.size(2)
        if end > self.shape[2]:
            raise ValueError(f"sequence of {end} positions exceeds max_seq_len {self.shape[2]}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before it."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.layer = layer  # index into the KV cache
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.keep_weights = False  # set True to store attention weights (for pictures); slower
        self.weights: torch.Tensor | None = None  # (B, nh, T, T_keys) when keep_weights

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
        if self.keep_weights:
            y = self._attention_with_weights(q, k, v, past)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token may see every cached position
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attention_with_weights(self, q, k, v, past: int) -> torch.Tensor:
        T, S = q.size(2), k.size(2)
        scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5  # (B, nh, T, S)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
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

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Run the blocks over (B, T, D) inputs; with a cache they continue after cache.pos positions."""
        start = cache.pos if cache is not None else 0
        if start + x.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + x.size(1)} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        x = x + self.pos_embed(torch.arange(start, start + x.size(1), device=x.device))
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.pos += x.size(1)
        return self.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final hidden states -> (B, T, V) next-token logits."""
        return self.lm_head(h)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Text-only language model: (B, T) token ids -> (B, T, V) logits."""
        return self.head(self.hidden(self.embed(tokens), cache))
