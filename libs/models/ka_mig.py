"""KA-MIG: GCN (or GAT) encoders of the knowledge graphs fused into every block of a frozen AutoNAT backbone.

The graph modules and their fusion are the plug-in of libs/models/knowledge.py; this file is AutoNAT's side of
its interface. Architecture, checkpoint names and the fusion-table identity:
docs/reference.md#ka-mig-graph-encoder-and-fusion.
"""
from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.knowledge import (GCN, GNN_KINDS, GCNConv, GraphConfig, GraphLayer, HostSpec,  # noqa: F401
                                   KnowledgeHost, NegativePrior, conv1x1, gcn_norm, stacked_convs, zero_conv)


class KAMIG(KnowledgeHost, AutoNAT):
    """AutoNAT + knowledge graphs: x <- x + sim_term + co_term - prior_term before every block."""

    def __init__(self, cfg: AutoNATConfig = None, graph_cfg: GraphConfig = None, graphs: dict = None):
        super().__init__(cfg)
        c = self.cfg
        spec = HostSpec(codebook_size=c.codebook_size, seq_len=c.seq_len, num_classes=c.num_classes,
                        mask_token_id=c.mask_token_id, embed_dim=c.embed_dim, num_blocks=len(self.blocks))
        self.attach_knowledge(spec, graph_cfg, graphs)

    def node_features(self):
        """[K,dim]: the word-embedding rows of the codebook tokens (C = E[0:K])."""
        return self.token_emb.word_embeddings.weight[: self.cfg.codebook_size]

    def run_with_injection(self, ids, class_ids, inject):
        """The U-ViT with inject(j, x) before block j; x [B,1+L,dim] (class token first) -> logits [B,L,K]."""
        return self.head(self.forward_blocks(self.embed(ids, class_ids), inject))
