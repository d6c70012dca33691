"""Vision Transformer (ViT): an image becomes a sequence of patch vectors that a transformer reads.

    image (B, 3, H, W) -> patches (B, N, P*P*3) -> patch embeddings (B, N, D) + positions -> blocks -> (B, N, D)

with N = (H / P) * (W / P). Every patch attends to every other patch (no causal mask): the encoder sees
the whole picture at once. Blocks are pre-norm, x + attn(norm(x)) then x + mlp(norm(x)), which trains
stably without warm-up tricks. The linear layers have no biases (as in LLaMA): the layer norm in front of
each block already learns a shift, and on a CPU each bias costs one more pass over the layer's output.

This file is self-contained (torch and einops only) so it can be copied alone into another project;
nanovlm/attention.py explains the attention it uses in detail.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class ViTConfig:
    image_size: int = 64  # input images are image_size x image_size pixels
    patch_size: int = 8  # each patch is patch_size x patch_size pixels
    channels: int = 3  # RGB
    dim: int = 128  # width of the patch embeddings and of every block
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads per block (dim must divide by it)
    mlp_ratio: int = 4  # hidden width of each MLP is mlp_ratio * dim

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViT {name} must be at least 1, got {getattr(self, name)}")
        if self.patch_size > self.image_size:
            raise ValueError(f"image_size {self.image_size} is smaller than one patch (patch_size {self.patch_size})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut (B, C, H, W) images into (B, N, P*P*C) flattened patches, row by row from the top left."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (every patch sees every patch)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # queries, keys and values of all heads in one matmul
        self.proj = nn.Linear(dim, dim, bias=False)  # mixes the heads' outputs back into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        # split the channels into queries, keys and values, each into heads: (B, nh, N, hs) each
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs); no mask: every patch sees every patch
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # the heads side by side again, then mixed


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, narrow."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then MLP, each added to the residual stream."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Patchify, embed, add learned positions, run the blocks: (B, C, H, W) in [0, 1] -> (B, N, D)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_size**2 * cfg.channels, cfg.dim, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.n_patches, cfg.dim) * 0.02)  # one vector per patch slot
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if images.shape[-3:] != (self.cfg.channels, size, size):
            raise ValueError(
                f"expected images of shape (B, {self.cfg.channels}, {size}, {size}), got {tuple(images.shape)}"
            )
        x = patchify(images * 2 - 1, self.cfg.patch_size)  # (B, N, P*P*C), pixels centred on 0
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)
