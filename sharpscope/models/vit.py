"""A small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Non-overlapping patches are embedded linearly, a class token is prepended, a learned
position embedding is added, and ``depth`` pre-norm encoder blocks follow::

    x = x + Attention(LayerNorm(x)),   x = x + MLP(LayerNorm(x))

The class token, after a final LayerNorm, feeds a linear head. Attention is written out
with ``matmul`` and ``softmax`` (no fused kernel) so that double backward, as
Hessian-vector products need, works on every backend.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SharpscopeError
from .norm import Option, check_input_shape, resolve_options

OPTIONS = {
    "patch": Option(4, int, low=1),
    "dim": Option(64, int, low=1),
    "depth": Option(4, int, low=1),
    "heads": Option(4, int, low=1),
    "mlp_ratio": Option(2.0, float, low=0.0),
    "dropout": Option(0.0, float, low=0.0, high=1.0, high_open=True),
}


class Attention(nn.Module):
    """Multi-head self-attention, softmax(QKᵀ/sqrt(d_head))V per head."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, d_head)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads), dim=-1)
        out = (self.dropout(weights) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.dropout(self.proj(out))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT over ``(C, H, W)`` images (square patches) or ``(C, L)`` sequences (patches of
    length ``patch``)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.unsqueeze = len(input_shape) == 1  # (N, L) inputs get a channel axis
        shape = (1, *input_shape) if self.unsqueeze else input_shape
        conv = nn.Conv2d if len(shape) == 3 else nn.Conv1d
        # a conv with kernel = stride = patch is a linear map of each flattened patch
        self.embed = conv(shape[0], dim, patch, stride=patch)
        num_patches = math.prod(s // patch for s in shape[1:])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(dropout)
        hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(
            *(EncoderBlock(dim, heads, hidden, dropout) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm / big_vision ViT init: truncated normal (std 0.02) for tokens, positions and
        # linear weights, zero biases, Xavier-uniform patch embedding as a linear map
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed.weight.view(self.embed.weight.shape[0], -1))
        nn.init.zeros_(self.embed.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.unsqueeze:
            x = x.unsqueeze(1)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.dropout(torch.cat([cls, tokens], dim=1) + self.position)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> ViT:
    """A small pre-norm ViT with a class token and learned position embedding.

    Args:
        input_shape: ``(C, H, W)`` with H and W divisible by ``patch``, or a sequence
            ``(L,)`` / ``(C, L)`` with L divisible by ``patch`` (patches of ``patch``
            consecutive positions).
        num_classes: output width.
        **options: ``patch`` (4), ``dim`` (64, embedding width), ``depth`` (4 blocks),
            ``heads`` (4, must divide ``dim``), ``mlp_ratio`` (2.0; MLP hidden width
            ``round(dim * mlp_ratio)``), ``dropout`` (0.0; on embeddings, attention
            weights and block outputs).

    Raises:
        SharpscopeError: unknown option, bad value, bad shape or incompatible sizes.

    >>> vit((3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    shape = check_input_shape(
        "vit", input_shape, num_classes, (1, 2, 3), "(C, H, W), (C, L) or (L,)"
    )
    opts = resolve_options("vit", options, OPTIONS)
    if opts["mlp_ratio"] <= 0:
        raise SharpscopeError(f"model 'vit': mlp_ratio must be > 0, got {opts['mlp_ratio']}")
    if opts["dim"] % opts["heads"]:
        raise SharpscopeError(
            f"model 'vit': dim={opts['dim']} must be divisible by heads={opts['heads']}"
        )
    spatial = shape[1:] if len(shape) > 1 else shape
    if any(s % opts["patch"] for s in spatial):
        raise SharpscopeError(
            f"model 'vit': input size {spatial} is not divisible by patch={opts['patch']}; "
            f"choose a patch that divides {' and '.join(map(str, sorted(set(spatial))))}"
        )
    return ViT(shape, num_classes, **opts)
