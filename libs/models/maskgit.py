"""MaskGIT bidirectional transformer (Chang et al. 2022), equal to the official JAX/Flax release in arithmetic and
parameters (docs/reference.md#maskgit).

A BERT encoder without segment ids or next-sentence head over one sequence of L+1 ids: position 0 holds the class
token, positions 1..L the image tokens. One vocabulary of V = K + C + 1 rows holds everything:

    ids 0 .. K-1        codebook tokens
    ids K .. K+C-1      class tokens (class c is id K + c: the label shifted by the codebook size)
    id  K+C  (= V-1)    [MASK]; the official code writes it as -1, which its embedding lookup wraps to row V-1

Layers, in order: word + position embedding -> LayerNorm (eps 1e-12) -> dropout; `depth` post-LN BERT layers
(`LN(x + Attn(x))`, then `LN(h + MLP(h))`, attention with biases on q/k/v/out, MLP = dense -> tanh-approximate GELU
(jax.nn.gelu's default) -> dense, every LayerNorm eps 1e-12); MLM head: dense -> GELU -> LayerNorm -> logits
against the word embedding matrix (tied) + a bias of V entries. `forward_tokens` returns all V logits at all L+1
positions, as the official `Transformer.__call__`; `forward` restricts them as the official inference does
(the first K columns) and drops the class position: logits [B,L,K].

Guidance (our addition; the release has no unconditional class): the null class id is C, whose class token K+C is
the [MASK] row, so the unconditional pass sees a masked class token.

Parameter names follow the Flax tree so that a converted checkpoint loads strictly (tools/convert_maskgit.py):

    Flax (params/...)                                         PyTorch                                 transform
    Embed_0/word_embeddings/embedding [V,D]                   embed.word_embeddings.weight            as is
    Embed_0/position_embeddings/embedding [L+1,D]             embed.position_embeddings.weight        as is
    Embed_0/embeddings_ln/{scale,bias}                        embed.embeddings_ln.{weight,bias}       as is
    TransformerLayer_i/Attention_0/self_attention/
        {query,key,value}/kernel [D,H,D/H]                    layers.i.attention.{query,key,value}.weight  reshape [D,D], transpose
        {query,key,value}/bias [H,D/H]                        layers.i.attention.{query,key,value}.bias    reshape [D]
        out/kernel [H,D/H,D], out/bias [D]                    layers.i.attention.out.{weight,bias}    reshape [D,D], transpose
    TransformerLayer_i/Attention_0/attention_output_ln        layers.i.attention.attention_output_ln  scale -> weight
    TransformerLayer_i/Mlp_0/{intermediate_output,layer_output}/{kernel,bias}
                                                              layers.i.mlp.{intermediate_output,layer_output}  kernel transposed
    TransformerLayer_i/Mlp_0/layer_output_ln                  layers.i.mlp.layer_output_ln            scale -> weight
    MlmLayer_0/mlm_dense/{kernel,bias}                        mlm_layer.mlm_dense.{weight,bias}       kernel transposed
    MlmLayer_0/mlm_ln/{scale,bias}                            mlm_layer.mlm_ln.{weight,bias}          as is
    MlmLayer_0/mlm_bias/bias [V]                              mlm_layer.mlm_bias                      as is
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LAYERNORM_EPS = 1e-12  # BERT's, every LayerNorm of the model
INIT_STD = 0.02  # truncated normal within +-2 std (pretraining only)


@dataclass
class MaskGITConfig:
    """Sizes of the transformer; defaults are the official ImageNet 256 model (`maskgit_imagenet256_checkpoint`).

    Field names are AutoNATConfig's where they mean the same; `depth` counts BERT layers, `dropout` is both the
    hidden and the attention-probability dropout, `qkv_bias` the biases of q/k/v (True in the release).
    """
    codebook_size: int = 1024   # K
    seq_len: int = 256          # L = 16x16 tokens; the model sees L+1 positions
    num_classes: int = 1000     # C
    embed_dim: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0      # intermediate size = embed_dim * mlp_ratio (3072)
    qkv_bias: bool = True
    dropout: float = 0.1
    use_checkpoint: bool = False  # activation checkpointing of the layers while training

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    @property
    def intermediate_size(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))


def maskgit_config(model_cfg) -> MaskGITConfig:
    """MaskGITConfig from a config's `model` block (unknown keys are an error)."""
    values = dict(model_cfg)
    unknown = sorted(set(values) - set(MaskGITConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"config.model has keys MaskGIT does not know: {', '.join(unknown)}")
    return MaskGITConfig(**values)


class MaskGIT(nn.Module):
    """MaskGIT token model: (ids [B,L] with [MASK] = mask_token_id, class_ids [B]) -> logits [B,L,K]."""

    def __init__(self, cfg: MaskGITConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or MaskGITConfig()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"num_heads {cfg.num_heads} must divide embed_dim {cfg.embed_dim}")
        self.embed = Embed(cfg.vocab_size, cfg.seq_len + 1, cfg.embed_dim, cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.embed_dim, cfg.num_heads, cfg.intermediate_size, cfg.dropout, cfg.qkv_bias)
            for _ in range(cfg.depth))
        self.mlm_layer = MlmLayer(cfg.embed_dim, cfg.vocab_size)
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
        """The layers in forward order (what --compile compiles, one injection point each under KA)."""
        return list(self.layers)

    def class_tokens(self, class_ids):
        """class_ids [B] in [0, C] -> ids [B,1] of the class position (label + K; the null class C -> [MASK])."""
        return (class_ids.view(-1, 1) + self.cfg.codebook_size).long()

    def forward_tokens(self, tokens, inject=None):
        """tokens [B,L+1] (class token first; -1 or V-1 for [MASK]) -> logits [B,L+1,V], the official output.

        `inject(j, x) -> x` (if given) updates the hidden state x [B,L+1,dim] before layer j (KAMaskGIT).
        """
        tokens = torch.where(tokens < 0, tokens + self.cfg.vocab_size, tokens)  # -1 -> V-1, as the Flax lookup
        x = self.embed(tokens)
        for j, layer in enumerate(self.layers):
            if inject is not None:
                x = inject(j, x)
            if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.mlm_layer(x, self.embed.word_embeddings.weight)

    def forward(self, ids, class_ids):
        """ids [B,L], class_ids [B] -> logits [B,L,K]: code columns only, class position dropped."""
        tokens = torch.cat([self.class_tokens(class_ids), ids.long()], dim=1)  # [B,L+1]
        return self.forward_tokens(tokens)[:, 1:, : self.cfg.codebook_size]


class Embed(nn.Module):
    """Word + position embedding -> LayerNorm(1e-12) -> dropout."""

    def __init__(self, vocab_size, max_len, dim, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.embeddings_ln = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens):  # [B,n] -> [B,n,dim]
        x = self.word_embeddings(tokens) + self.position_embeddings.weight[: tokens.shape[1]]
        return self.dropout(self.embeddings_ln(x))


class TransformerLayer(nn.Module):
    """Post-LN BERT layer: attention block, then MLP block, each closing with residual + LayerNorm."""

    def __init__(self, dim, num_heads, hidden, dropout, qkv_bias=True):
        super().__init__()
        self.attention = Attention(dim, num_heads, dropout, qkv_bias)
        self.mlp = Mlp(dim, hidden, dropout)

    def forward(self, x):
        return self.mlp(self.attention(x))


class Attention(nn.Module):
    """LN(x + dropout(SelfAttention(x))); q/k/v/out are separate linears as in the Flax tree."""

    def __init__(self, dim, num_heads, dropout, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.attention_output_ln = nn.LayerNorm(dim, eps=LAYERNORM_EPS)

    def heads(self, linear, x):  # [B,n,dim] -> [B,h,n,dim/h] (heads split head-major, as the Flax kernel)
        B, n, C = x.shape
        return linear(x).view(B, n, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x):
        B, n, C = x.shape
        q, k, v = (self.heads(lin, x) for lin in (self.query, self.key, self.value))
        drop = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B,h,n,C/h], no mask: bidirectional
        out = self.out(out.transpose(1, 2).reshape(B, n, C))
        return self.attention_output_ln(self.dropout(out) + x)


class Mlp(nn.Module):
    """LN(h + dropout(dense(gelu_tanh(dense(h)))))."""

    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.intermediate_output = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")  # no parameters; the CPU kernels fold it into the linear before it
        self.layer_output = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_output_ln = nn.LayerNorm(dim, eps=LAYERNORM_EPS)

    def forward(self, h):
        out = self.layer_output(self.act(self.intermediate_output(h)))
        return self.layer_output_ln(self.dropout(out) + h)


class MlmLayer(nn.Module):
    """Head: dense -> gelu_tanh -> LayerNorm -> h @ E^T + bias, E the word embedding [V,dim] (tied)."""

    def __init__(self, dim, vocab_size):
        super().__init__()
        self.mlm_dense = nn.Linear(dim, dim)
        self.act = nn.GELU(approximate="tanh")  # no parameters; the CPU kernels fold it into mlm_dense
        self.mlm_ln = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x, word_embeddings):  # x [B,n,dim], word_embeddings [V,dim] -> [B,n,V]
        h = self.mlm_ln(self.act(self.mlm_dense(x)))
        return F.linear(h, word_embeddings, self.mlm_bias)


def init_weights(m):
    """The release's initialisers: truncated normal (0.02, within +-2 std) for dense kernels and embeddings,
    zero biases, unit LayerNorms (the MLM bias starts at zero)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
