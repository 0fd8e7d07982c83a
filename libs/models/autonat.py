"""AutoNAT backbone: a U-ViT over VQ tokens with long skips and a tied MLM head (docs/reference.md#backbone)."""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class AutoNATConfig:
    """Sizes of the backbone; defaults are AutoNAT-L (`nnet_ema.pth`)."""
    codebook_size: int = 1024   # K; the vocabulary is K+1 and id K is [MASK]
    seq_len: int = 256          # L = 16x16 tokens
    num_classes: int = 1000     # class id `num_classes` is the null class (guidance)
    embed_dim: int = 768
    depth: int = 24             # depth//2 in-blocks, one mid-block, depth//2 out-blocks
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    dropout: float = 0.1        # token-embedding dropout
    use_checkpoint: bool = False  # activation checkpointing of the blocks while training

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def null_class_id(self) -> int:
        return self.num_classes


class Embeddings(nn.Module):
    """Word + learned position embedding -> LayerNorm(1e-6) -> dropout."""

    def __init__(self, vocab_size, max_len, dim, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):  # ids [B,n] -> [B,n,dim]
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x):  # [B,n,dim] -> q, k, v each [B,h,n,dim/h]
        B, n, C = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.num_heads, C // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        B, n, C = x.shape
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # [B,h,n,C/h]
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip with `skip_linear`."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MlmLayer(nn.Module):
    """Head: fc -> GELU -> LayerNorm -> logits against the detached word embedding + bias."""

    def __init__(self, dim, vocab_size):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(dim)

    def forward(self, x, word_embeddings):  # x [B,n,dim], word_embeddings [V,dim] -> [B,n,V]
        h = self.ln(self.act(self.fc(x)))
        return F.linear(h, word_embeddings.detach(), self.bias.view(-1))


class AutoNAT(nn.Module):
    """U-ViT token model: (ids [B,L], class_ids [B]) -> logits [B,L,K]."""

    def __init__(self, cfg: AutoNATConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or AutoNATConfig()
        if cfg.depth % 2:
            raise ValueError(f"depth must be even (in/out block pairs), got {cfg.depth}")
        d = cfg.embed_dim
        self.token_emb = Embeddings(cfg.codebook_size + 1, cfg.seq_len, d, cfg.dropout)
        self.context_embed = Embeddings(cfg.num_classes + 1, 1, d, 0.0)
        blk = dict(dim=d, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)
        self.in_blocks = nn.ModuleList(Block(**blk) for _ in range(cfg.depth // 2))
        self.mid_block = Block(**blk)
        self.out_blocks = nn.ModuleList(Block(**blk, skip=True) for _ in range(cfg.depth // 2))
        self.norm = nn.LayerNorm(d)
        self.mlm_layer = MlmLayer(d, cfg.codebook_size + 1)
        self.apply(init_weights)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def mask_token_id(self) -> int:
        return self.cfg.mask_token_id

    @property
    def null_class_id(self) -> int:
        return self.cfg.null_class_id

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def blocks(self):
        """All blocks in forward order (in-blocks, mid-block, out-blocks)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def embed(self, ids, class_ids):
        """-> x [B,1+L,dim]: the class token followed by the L token embeddings."""
        if class_ids.dim() == 1:
            class_ids = class_ids[:, None]
        return torch.cat([self.context_embed(class_ids), self.token_emb(ids)], dim=1)

    def run_block(self, block, x, skip=None):
        if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward_blocks(self, x, inject=None):
        """Runs the U-ViT; `inject(j, x) -> x` (if given) updates the stream before block j (forward order)."""
        skips = []
        for j, block in enumerate(self.blocks):
            if inject is not None:
                x = inject(j, x)
            if j < len(self.in_blocks):
                x = self.run_block(block, x)
                skips.append(x)
            elif j == len(self.in_blocks):
                x = self.run_block(block, x)
            else:
                x = self.run_block(block, x, skips.pop())
        return self.norm(x)

    def head(self, x):
        """[B,1+L,dim] -> logits [B,L,K] (class position and the [MASK] column dropped)."""
        logits = self.mlm_layer(x, self.token_emb.word_embeddings.weight)
        return logits[:, 1:, : self.cfg.codebook_size]

    def forward(self, ids, class_ids):
        return self.head(self.forward_blocks(self.embed(ids, class_ids)))


def init_weights(m):
    """Truncated-normal(0.02) linears, zero biases, unit LayerNorms, normal(0.02) embeddings."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
