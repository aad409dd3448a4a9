"""Vision Transformers (Dosovitskiy et al. 2021) sized for small images, trained from scratch.

A stride-p conv cuts the image into p x p patches and embeds each one; a learned class token (or
none, with `pool: mean`) and learned position embeddings are added; pre-norm encoder blocks
(multi-head self-attention, then a GELU MLP, each inside a residual) follow; a final LayerNorm, the
class token (or the mean of the patch tokens) and one Linear give the logits.

"Tiny" here is sized for small images and a CPU: 128 wide, 6 blocks of 4 heads, MLP ratio 2 (the
shape ViT-Lite gives small data sets, Hassani et al. 2021, at half its width and 6 of its 7 blocks),
811k parameters. timm's ViT-Tiny (DeiT-Tiny: 192 wide, 12 blocks, MLP ratio 4, 5.35M) trains at
34 images/s on this project's 2-core CPU against 182 for ours, which leaves a 10-minute run on 3,500
MNIST digits 5 epochs instead of 25 (`vit` with dim 192, depth 12, heads 3, mlp_ratio 4 builds it).

- `vit_tiny_patch4`: CIFAR-10 32x32x3, 8x8 = 64 patches + the class token: 811,146 params at 10 classes.
- `vit_tiny_patch7`: MNIST 28x28x1, 4x4 = 16 patches + the class token: 805,130 params at 10 classes.
- `vit`: any size (`patch`, `dim`, `depth`, `heads`, `mlp_ratio`), for recipes and tests.

Grad-CAM does not fit a transformer (no spatial conv map at the top); the model declares its patch
grid (`attention_grid`) and gives its attention probabilities (`attention_maps`), which
`dlkit.evaluate.attention` turns into an attention rollout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlkit.errors import ConfigError
from dlkit.models import register_model
from dlkit.models.surface import ModelSurface

TINY = (128, 6, 4, 2.0)  # width, blocks, heads, MLP ratio


class Attention(nn.Module):
    """Multi-head self-attention: one Linear makes q, k and v for every head, `proj` mixes the heads."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, keep: list[Tensor] | None = None) -> Tensor:
        """Attended tokens (N, T, D); with `keep`, the attention probabilities (N, heads, T, T) are
        computed explicitly and appended to it (in the graph, so gradients reach them)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if keep is None:
            # the fused kernel: one call, no (N, heads, T, T) tensor kept for the backward pass
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
            keep.append(attn)
            out = F.dropout(attn, self.dropout, self.training) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole examples while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """`x`, zeroed for a random `p` of the examples and scaled by 1 / (1 - p), while training."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, keep: list[Tensor] | None = None) -> Tensor:
        """The block's output tokens (N, T, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), keep))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbedding(nn.Module):
    """Image (N, C, H, W) to tokens (N, T, D): patches embedded by a stride-p conv, the class token
    prepended (unless `class_token` is off), learned position embeddings added."""

    def __init__(self, channels: int, grid: tuple[int, int], patch: int, dim: int, class_token: bool,
                 dropout: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + int(class_token), dim))
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (N, T, D), the class token first."""
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            # x.shape[0], not len(x): an ONNX trace keeps the batch size free
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embed)


class Encoder(nn.Module):
    """The trunk: patch embedding, the encoder blocks and the final LayerNorm; tokens (N, T, D) out."""

    def __init__(self, embed: PatchEmbedding, blocks: Sequence[Block], dim: int) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, keep: list[Tensor] | None = None) -> Tensor:
        """Normalised output tokens (N, T, D); `keep` collects each block's attention probabilities."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)


class TokenPool(nn.Module):
    """Tokens (N, T, D) to one vector (N, D): the class token, or the mean of the patch tokens."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        """The pooled vector of each example."""
        return x[:, 0] if self.pool == "token" else x.mean(1)

    def extra_repr(self) -> str:
        return self.pool


class VisionTransformer(ModelSurface):
    """`features` (patch embedding, encoder blocks, final norm) -> `head` (token pool, Linear)."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], patch: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, pool: str = "token", dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        channels, grid = _check(input_shape, patch, dim, heads, pool, dropout, drop_path)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # deeper blocks drop more (DeiT)
        embed = PatchEmbedding(channels, grid, patch, dim, class_token=pool == "token", dropout=dropout)
        self.features = Encoder(embed, [Block(dim, heads, mlp_ratio, dropout, r) for r in rates], dim)
        self.head = nn.Sequential(TokenPool(pool), nn.Linear(dim, num_classes))
        self.attention_grid = grid
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for a batch of images."""
        return self.head(self.features(x))

    def attention_maps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Class logits and each block's attention probabilities (N, heads, T, T), input side first,
        the class token first among the T tokens; all in the graph, so gradients reach the maps."""
        keep: list[Tensor] = []
        logits = self.head(self.features(x, keep))
        return logits, keep

    @property
    def cam_layer(self) -> None:
        """No conv map at the top: Grad-CAM does not apply (attention rollout explains a ViT)."""
        return None

    @property
    def blocks(self) -> list[nn.Module]:
        """The patch embedding, each encoder block (the last with the final norm), then the head."""
        trunk = self.features
        *first, last = trunk.blocks
        return [trunk.embed, *first, nn.Sequential(last, trunk.norm), self.head]


def _check(input_shape: Sequence[int], patch: int, dim: int, heads: int, pool: str, dropout: float,
           drop_path: float) -> tuple[int, tuple[int, int]]:
    """The channel count and patch grid of `input_shape`, or a ConfigError naming the field to change."""
    if len(input_shape) != 3:
        raise ConfigError(f"a ViT needs images shaped (channels, height, width), got input_shape {tuple(input_shape)}")
    channels, height, width = input_shape
    if patch < 1 or height % patch or width % patch:
        raise ConfigError(f"input_shape {tuple(input_shape)} does not split into {patch}x{patch} patches; set "
                          "data.image_size or model.patch so that the patch size divides the image size")
    if dim % heads:
        raise ConfigError(f"model.dim {dim} must be a multiple of model.heads {heads}")
    if pool not in ("token", "mean"):
        raise ConfigError(f"model.pool must be 'token' (class token) or 'mean' (mean of the patch tokens), got '{pool}'")
    for name, value in (("dropout", dropout), ("drop_path", drop_path)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{name} must be in [0, 1), got {value}")
    return channels, (height // patch, width // patch)


@register_model("vit")
def vit(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), patch: int = 4, dim: int = 128,
        depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0, pool: str = "token", dropout: float = 0.0,
        drop_path: float = 0.0) -> VisionTransformer:
    """A ViT of any size; the tiny shape with 4x4 patches unless told otherwise."""
    return VisionTransformer(num_classes, input_shape, patch, dim, depth, heads, mlp_ratio, pool, dropout, drop_path)


@register_model("vit_tiny_patch4")
def vit_tiny_patch4(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), pool: str = "token",
                    dropout: float = 0.0, drop_path: float = 0.1) -> VisionTransformer:
    """The tiny ViT (128 wide, 6 blocks, 4 heads) on 4x4 patches, for CIFAR-10; 811,146 params at 10 classes."""
    return VisionTransformer(num_classes, input_shape, 4, *TINY, pool, dropout, drop_path)


@register_model("vit_tiny_patch7")
def vit_tiny_patch7(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), pool: str = "token",
                    dropout: float = 0.0, drop_path: float = 0.1) -> VisionTransformer:
    """The tiny ViT (128 wide, 6 blocks, 4 heads) on 7x7 patches, for MNIST; 805,130 params at 10 classes."""
    return VisionTransformer(num_classes, input_shape, 7, *TINY, pool, dropout, drop_path)
