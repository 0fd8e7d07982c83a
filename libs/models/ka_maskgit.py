"""KA-MaskGIT: the knowledge graphs (libs/models/knowledge.py) fused into every layer of a frozen MaskGIT.

No KA-MaskGIT code or checkpoint was released; the placement is our choice (docs/reference.md#ka-on-maskgit): the
term is added to the hidden state before each of the `depth` post-LN BERT layers, i.e. after the previous layer's
closing LayerNorm (before layer 0: after the embedding LayerNorm), at the L image positions; the class position
is left alone. With the zero-initialised fusion convs the model is exactly MaskGIT.
"""
import torch

from libs.models.knowledge import GraphConfig, HostSpec, KnowledgeHost
from libs.models.maskgit import MaskGIT, MaskGITConfig


class KAMaskGIT(KnowledgeHost, MaskGIT):
    """MaskGIT + knowledge graphs: (ids [B,L] with [MASK] = K + C, class_ids [B] in [0, C]) -> logits [B,L,K]."""

    def __init__(self, cfg: MaskGITConfig = None, graph_cfg: GraphConfig = None, graphs: dict = None):
        super().__init__(cfg)
        c = self.cfg
        spec = HostSpec(codebook_size=c.codebook_size, seq_len=c.seq_len, num_classes=c.num_classes,
                        mask_token_id=c.mask_token_id, embed_dim=c.embed_dim, num_blocks=len(self.layers))
        self.attach_knowledge(spec, graph_cfg, graphs)

    def node_features(self):
        """[K,dim]: the first K rows of the shared vocabulary's word embedding (the codebook tokens)."""
        return self.embed.word_embeddings.weight[: self.cfg.codebook_size]

    def run_with_injection(self, ids, class_ids, inject):
        """MaskGIT's forward with inject(j, x) before layer j; x [B,1+L,dim] (class token first)."""
        tokens = torch.cat([self.class_tokens(class_ids), ids.long()], dim=1)  # [B,L+1]
        return self.forward_tokens(tokens, inject)[:, 1:, : self.cfg.codebook_size]
