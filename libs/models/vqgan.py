"""VQGAN f16 tokenizer (MaskGIT/MAGE flavour, docs/reference.md#tokenizer): images in [0,1] <-> token ids."""
from dataclasses import dataclass, asdict
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQGANConfig:
    """Sizes of the tokenizer; defaults are the published MAGE `vqgan_jax_strongaug.ckpt`."""
    channels: int = 128
    channel_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embed_dim: int = 256
    codebook_size: int = 1024
    resolution: int = 256
    norm_groups: int = 32
    dropout: float = 0.0

    @property
    def grid_size(self) -> int:
        return self.resolution // 2 ** (len(self.channel_mult) - 1)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """Two GroupNorm-swish-conv3x3 stages; on a width change the 1x1 shortcut maps the *output* h."""

    def __init__(self, in_ch, out_ch, groups, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.changes_width = in_ch != out_ch
        if self.changes_width:
            self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.changes_width:
            return self.nin_shortcut(h) + h  # quirk of the published weights: shortcut of h, not x
        return x + h


class Level(nn.Module):
    """One resolution level: a stack of res blocks (+ an optional upsample conv in the decoder)."""

    def __init__(self, in_ch, out_ch, n_blocks, groups, dropout, upsample=False):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dropout) for i in range(n_blocks))
        if upsample:
            self.upsample = Upsample(out_ch)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """Two res blocks at the lowest resolution (no attention)."""

    def __init__(self, ch, groups, dropout):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, dropout)
        self.block_2 = ResnetBlock(ch, ch, groups, dropout)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """[B,3,H,W] -> [B,embed_dim,H/16,W/16]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, cfg.channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = cfg.channels
        for w in widths:
            self.down.append(Level(in_ch, w, cfg.num_res_blocks, cfg.norm_groups, cfg.dropout))
            in_ch = w
        self.mid = Mid(in_ch, cfg.norm_groups, cfg.dropout)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, cfg.embed_dim, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2)  # parameter-free downsampling
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B,embed_dim,h,w] -> [B,3,16h,16w] (unclamped)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, in_ch, 3, padding=1)
        self.mid = Mid(in_ch, cfg.norm_groups, cfg.dropout)
        levels = []
        for i in reversed(range(len(widths))):
            levels.insert(0, Level(in_ch, widths[i], cfg.num_res_blocks, cfg.norm_groups, cfg.dropout,
                                   upsample=i != 0))
            in_ch = widths[i]
        self.up = nn.ModuleList(levels)  # indexed by level, run from the last one down
        self.norm_out = nn.GroupNorm(cfg.norm_groups, in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook row by squared L2."""

    def __init__(self, codebook_size, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def quantize(self, z):
        """z [B,D,h,w] -> ids [B,h,w] (long)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()  # [B*h*w, D]
        codes = self.embedding.weight.float()  # [K, D]
        # |z|^2 is constant per row, so argmin of |c|^2 - 2 z.c gives the nearest code
        dist = (codes * codes).sum(1)[None, :] - 2.0 * flat @ codes.t()  # [B*h*w, K]
        return dist.argmin(dim=1).view(B, h, w)

    def lookup(self, ids):
        """ids [B,h,w] -> z [B,D,h,w]."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """Tokenizer: `encode` images in [0,1] to ids [B,h,w]; `decode` ids to images in [0,1]."""

    def __init__(self, cfg: VQGANConfig = None):
        super().__init__()
        self.cfg = cfg or VQGANConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self.quantize = VectorQuantizer(self.cfg.codebook_size, self.cfg.embed_dim)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid_size(self) -> int:
        return self.cfg.grid_size

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> ids [B,H/16,W/16] long."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images [B,3,H,W], got {tuple(images.shape)}")
        return self.quantize.quantize(self.encoder(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,h,w] or [B,h*w] long -> images [B,3,16h,16w] in [0,1]."""
        if ids.dim() == 2:
            side = int(round(ids.shape[1] ** 0.5))
            ids = ids.view(ids.shape[0], side, side)
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host read (a GPU sync) per batch
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"token ids must lie in [0,{self.codebook_size}); got range "
                             f"[{lo},{hi}] (a [MASK] id left in the sequence?)")
        return self.decoder(self.quantize.lookup(ids)).clamp(0.0, 1.0)
