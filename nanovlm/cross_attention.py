"""Cross-attention fusion (Flamingo): the text reads the image from inside the language model.

    image features (B, N, D_vision) -> Perceiver resampler -> latents (B, L, D)
    text hidden states (B, T, D) -> [gated cross-attention to the latents] -> decoder block -> ... -> logits

Projection fusion (vlm.py's default) puts image tokens in front of the text, so the decoder's sequence grows
by N. Here the sequence is the text alone: before some of the decoder's blocks sits a gated cross-attention
layer whose queries are the text positions and whose keys and values are the image's latents.

The gate is what lets a frozen, pretrained language model gain eyes without losing its words:

    x <- x + tanh(a) * CrossAttention(LayerNorm(x), latents)
    x <- x + tanh(b) * MLP(LayerNorm(x))

with a and b scalars that start at 0. At the start tanh(0) = 0, so every layer adds exactly nothing and the
model computes exactly what the text-only model computes; training opens each gate as far as the image
helps. (While a gate is 0 its layer's weights get no gradient, but the gate itself does, so it opens first.)

The Perceiver resampler turns any number of image features into a fixed number L of latents: L learned
vectors attend to the features (and to themselves), then pass an MLP, a few times over. The language model
then pays for L keys per cross-attention, whatever the image's resolution.

Learned latents are the same for every image, so at the start each one reads a blend of the whole picture:
what is there survives, where it is mostly does not. With region_latents each latent also starts from one
region of the image (the features average-pooled onto a sqrt(L) x sqrt(L) grid), so latent r is about
region r from the first step and the text can ask where things are, as prefix fusion's image tokens let it.

This file imports only torch and einops, so it can be copied alone into another project; that is why its MLP
is a copy of the one in vit.py and decoder.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class CrossAttentionConfig:
    vision_dim: int = 128  # width of each feature the resampler reads: the vision encoder's, times s^2 merged
    dim: int = 128  # width of the language model (and of the latents)
    n_heads: int = 4  # attention heads (dim must divide by it)
    n_latents: int = 16  # L: image vectors the text can read, whatever the number of patches
    resampler_layers: int = 1  # Perceiver blocks the latents pass through
    every: int = 1  # a gated cross-attention layer before every `every`-th decoder block, from the first
    mlp_ratio: int = 4  # hidden width of each MLP is mlp_ratio * dim
    pixel_shuffle: int = 1  # s: the model merges s x s neighbouring patches into one feature first (1 = off)
    region_latents: bool = False  # each latent starts from one region of the image, not from a learned vector alone

    def __post_init__(self) -> None:
        names = ("vision_dim", "dim", "n_heads", "n_latents", "resampler_layers", "every", "mlp_ratio", "pixel_shuffle")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"cross-attention {name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"cross-attention dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.region_latents and math.isqrt(self.n_latents) ** 2 != self.n_latents:
            raise ValueError(
                f"region_latents lay the latents on a square grid; n_latents {self.n_latents} is not a square"
            )


class CrossAttention(nn.Module):
    """Multi-head attention whose queries come from x and whose keys and values come from a context."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)  # keys and values of all heads in one matmul
        self.proj = nn.Linear(dim, dim, bias=False)  # mixes the heads' outputs back into the residual stream
        self.keep_weights = False  # set True to store attention weights (for pictures); slower
        self.weights: torch.Tensor | None = None  # (B, nh, T, S) when keep_weights

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) queries, context: (B, S, D) keys and values -> (B, T, D); no mask."""
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.n_heads)
        k, v = rearrange(self.kv(context), "b s (two h d) -> two b h s d", two=2, h=self.n_heads)
        if self.keep_weights:
            self.weights = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).softmax(dim=-1)  # (B, nh, T, S)
            y = self.weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, narrow."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * xattn(x, latents), then x + tanh(b) * mlp(x); a = b = 0 at the start: the identity."""

    def __init__(self, cfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CrossAttention(cfg.dim, cfg.n_heads)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(self.ln1(x), latents)
        return x + self.mlp_gate.tanh() * self.mlp(self.ln2(x))


class ResamplerBlock(nn.Module):
    """The latents attend to [image features, latents] (Flamingo lets them see themselves too), then an MLP."""

    def __init__(self, cfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.ln_latents = nn.LayerNorm(cfg.dim)
        self.ln_features = nn.LayerNorm(cfg.dim)
        self.attn = CrossAttention(cfg.dim, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.ln_latents(latents)
        latents = latents + self.attn(h, torch.cat([self.ln_features(features), h], dim=1))
        return latents + self.mlp(self.ln2(latents))


class PerceiverResampler(nn.Module):
    """(B, N, vision_dim) image features, any N -> (B, n_latents, dim) latents."""

    def __init__(self, cfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.vision_dim, cfg.dim, bias=False)  # into the language model's width
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.dim) * 0.02)  # learned queries, shared by all images
        self.blocks = nn.ModuleList(ResamplerBlock(cfg) for _ in range(cfg.resampler_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.in_proj(features)  # (B, N, D)
        latents = self.latents.expand(features.size(0), -1, -1)  # (B, L, D)
        if self.cfg.region_latents:
            latents = latents + regions(features, self.cfg.n_latents)
        for block in self.blocks:
            latents = block(latents, features)
        return self.ln_f(latents)


def regions(features: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) features of a square grid of patches, row by row -> (B, n, D) averages over a sqrt(n) x sqrt(n)
    grid of regions of the image, row by row."""
    side = math.isqrt(features.size(1))
    if side * side != features.size(1):
        raise ValueError(f"region latents need features on a square grid of patches; got {features.size(1)}")
    grid = rearrange(features, "b (h w) d -> b d h w", h=side)
    return rearrange(F.adaptive_avg_pool2d(grid, math.isqrt(n)), "b d h w -> b (h w) d")


def n_cross_layers(n_decoder_layers: int, every: int) -> int:
    """How many gated layers a decoder of n_decoder_layers blocks gets: one before blocks 0, every, 2*every, ..."""
    return math.ceil(n_decoder_layers / every)
