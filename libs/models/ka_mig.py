"""KA-MIG: GCN (or GAT) encoders of the knowledge graphs fused into every block of a frozen AutoNAT backbone.

Architecture, checkpoint names and the fusion-table identity: docs/reference.md#ka-mig-graph-encoder-and-fusion.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.gat import GAT, gat_edges
from libs.graphs.recipes import incompatibility_rows, unpack_occurrence_torch

GNN_KINDS = ("gcn", "gat")


@dataclass
class GraphConfig:
    """Which graphs are used and the graph encoder; defaults are the released KA-MIG model."""
    use_co: bool = True          # token co-occurrence G_co (positive)
    use_sim: bool = True         # token semantic similarity G_s (positive)
    use_incompat: bool = True    # per-class position-token incompatibility G_p (negative)
    gcn_layers: int = 3          # encoder layers; the width is the backbone's embed_dim (outputs join the tokens)
    gnn: str = "gcn"             # encoder of G_co / G_s: "gcn" (the released model) or "gat" (libs/models/gat.py)

    def __post_init__(self):
        if self.gnn not in GNN_KINDS:
            raise ValueError(f"unknown graph encoder graph.gnn='{self.gnn}' (one of {', '.join(GNN_KINDS)})")


# ----------------------------------------------------------------------------- GCN


def gcn_norm(edge_index: torch.Tensor, edge_weight: torch.Tensor, num_nodes: int):
    """torch_geometric GCNConv normalisation -> (index [2,E'] as (target, source), weight [E']).

    Every node ends with one self-loop: its existing loop's weight, else 1; deg(v) = sum of weights into v;
    edge u->v gets w / sqrt(deg(u) deg(v)); messages flow from edge_index[0] to edge_index[1].
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    w = edge_weight.to(torch.float32)
    is_loop = src == dst
    loop_w = torch.ones(num_nodes, dtype=w.dtype, device=w.device)
    loop_w[src[is_loop]] = w[is_loop]  # an existing loop keeps its weight (one loop per node, as PyG)
    nodes = torch.arange(num_nodes, device=src.device)
    src = torch.cat([src[~is_loop], nodes])
    dst = torch.cat([dst[~is_loop], nodes])
    w = torch.cat([w[~is_loop], loop_w])
    deg = torch.zeros(num_nodes, dtype=w.dtype, device=w.device).index_add_(0, dst, w)  # in-degree
    inv_sqrt = deg.pow(-0.5).masked_fill_(deg == 0, 0.0)
    return torch.stack([dst, src]), inv_sqrt[src] * w * inv_sqrt[dst]


class GCNConv(nn.Module):
    """out = A_hat (X W^T) + b with A_hat from `gcn_norm` (torch_geometric GCNConv defaults)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)  # glorot, as torch_geometric

    def forward(self, x, adj):  # x [N,in], adj sparse [N,N] (target, source) -> [N,out]
        return torch.sparse.mm(adj, self.lin(x)) + self.bias


class GCN(nn.Module):
    """Stack of GCN layers with ReLU; a node's representation is the mean of the layer outputs."""

    def __init__(self, dim, layers):
        super().__init__()
        for i in range(layers):  # conv1, conv2, ...: names fixed by the released weights
            self.add_module(f"conv{i + 1}", GCNConv(dim, dim))
        self.layers = layers

    def forward(self, x, adj):  # x [K,dim] -> [K,dim]
        outs = []
        for i in range(self.layers):
            x = F.relu(getattr(self, f"conv{i + 1}")(x, adj))
            outs.append(x)
        return torch.stack(outs).mean(0)


class NegativePrior(nn.Module):
    """Conv1x1 over the codebook rows; P = G_p[class] @ Conv1x1(C) is the mean of the projected incompatible codes."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 1)  # name fixed by the released weights

    def forward(self, codes):  # codes [K,dim] -> [K,dim]
        return conv1x1(self.conv1, codes)


def zero_conv(dim) -> nn.Conv1d:
    """A 1x1 conv with zero weight and bias: the fused model starts as the bare backbone."""
    conv = nn.Conv1d(dim, dim, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(conv: nn.Conv1d, x):  # x [...,dim] -> [...,dim]; a Conv1d(k=1) over the token axis
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


def stacked_convs(convs) -> tuple:
    """(weight [P,dim,dim], bias [P,dim]) in float32 of a list of P 1x1 convs."""
    weight = torch.stack([c.weight[:, :, 0] for c in convs]).float()
    bias = torch.stack([c.bias for c in convs]).float()
    return weight, bias


# ----------------------------------------------------------------------------- graph layer


class GraphLayer(nn.Module):
    """The graph-aware encoder: GCNs over G_co / G_s, the G_p prior, and 1x1 fusion convs per block.

    Attribute names are fixed by the released weights (graph_nnet_ema.pth):
      co_graph_layer                 the GCN over the co-occurrence graph G_co
      re_graph_layer                 the GCN over the semantic-similarity graph G_s ("replace" graph)
      pos_neg_codebook_graph_layer   the Conv1x1 of the incompatibility prior G_p
      zero_convs[p]                  fusion conv of point p, shared by the two *positive* graphs
      zero_convs_pos[p]              fusion conv of point p of the *negative* G_p term, despite its name
    """

    def __init__(self, dim: int, num_points: int, cfg: GraphConfig):
        super().__init__()
        self.cfg = cfg
        encoder = GAT if cfg.gnn == "gat" else GCN
        if cfg.use_co:
            self.co_graph_layer = encoder(dim, cfg.gcn_layers)
        if cfg.use_sim:
            self.re_graph_layer = encoder(dim, cfg.gcn_layers)
        if cfg.use_incompat:
            self.pos_neg_codebook_graph_layer = NegativePrior(dim)
        if cfg.use_co or cfg.use_sim:
            self.zero_convs = nn.ModuleList(zero_conv(dim) for _ in range(num_points))
        if cfg.use_incompat:
            self.zero_convs_pos = nn.ModuleList(zero_conv(dim) for _ in range(num_points))
        self.num_points = num_points



# ----------------------------------------------------------------------------- model


class KAMIG(AutoNAT):
    """AutoNAT + knowledge graphs: x <- x + sim_term + co_term - prior_term before every block."""

    def __init__(self, cfg: AutoNATConfig = None, graph_cfg: GraphConfig = None, graphs: dict = None):
        super().__init__(cfg)
        self.graph_cfg = graph_cfg or GraphConfig()
        self.graph_layer = GraphLayer(self.cfg.embed_dim, len(self.blocks), self.graph_cfg)
        self.has_graphs = False
        if graphs is not None:
            self.set_graphs(**graphs)

    # --- graphs (non-persistent buffers: moved with the module, never saved in the weights)

    def set_graphs(self, co=None, sim=None, incompat=None):
        """co/sim: (edge_index [2,E], edge_weight [E][, num_nodes]); incompat: packed bits uint8 [C,L,ceil(K/8)].

        Raises ValueError when a switched-on graph is missing or its size does not match the model.
        """
        K, g = self.cfg.codebook_size, self.graph_cfg
        device = self.token_emb.word_embeddings.weight.device
        for name, graph, used in (("co", co, g.use_co), ("sim", sim, g.use_sim)):
            if not used:
                continue
            if graph is None:
                raise ValueError(f"graph.use_{name} is on but no {name} graph was given")
            edge_index, edge_weight = graph[:2]
            nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
            num_nodes = graph[2] if len(graph) > 2 and graph[2] is not None else nodes
            if num_nodes != K or nodes > K:
                raise ValueError(f"the {name} graph has {num_nodes} nodes (codebook size) but the model's "
                                 f"codebook size is {K}")
            if g.gnn == "gat":  # attention: the edges only (their weights play no part)
                self.register_buffer(f"{name}_edges", gat_edges(torch.as_tensor(edge_index), K).to(device),
                                     persistent=False)
            else:
                index, weight = gcn_norm(torch.as_tensor(edge_index), torch.as_tensor(edge_weight), K)
                # coalesced once here (sorted, duplicate edges summed): the forward never coalesces, a step
                # whose output size depends on the data (a host read on a GPU)
                adj = torch.sparse_coo_tensor(index, weight, (K, K), check_invariants=False).coalesce()
                self.register_buffer(f"{name}_adj_index", adj.indices().clone().to(device), persistent=False)
                self.register_buffer(f"{name}_adj_weight", adj.values().clone().to(device), persistent=False)
        if g.use_incompat:
            if incompat is None:
                raise ValueError("graph.use_incompat is on but no incompatibility graph was given")
            incompat = torch.as_tensor(incompat)
            expected = (self.cfg.num_classes, self.cfg.seq_len, (K + 7) // 8)
            if incompat.dtype != torch.uint8 or tuple(incompat.shape) != expected:
                raise ValueError(f"the incompatibility graph has shape {tuple(incompat.shape)} ({incompat.dtype}) "
                                 f"but the model needs packed bits {expected} (classes, tokens, codebook "
                                 f"{K} / 8)")
            self.register_buffer("occurrence_bits", incompat.to(device), persistent=False)
        self.has_graphs = True

    def require_graphs(self):
        """Raises RuntimeError when set_graphs was never called."""
        if not self.has_graphs:
            raise RuntimeError("KAMIG has no graphs: call set_graphs(...) (see libs.graphs.files loaders)")

    def adjacency(self, name):
        """Normalised sparse adjacency [K,K] of graph `name` ('co' or 'sim'), coalesced (by set_graphs)."""
        index, weight = getattr(self, f"{name}_adj_index"), getattr(self, f"{name}_adj_weight")
        K = self.cfg.codebook_size
        return torch.sparse_coo_tensor(index, weight, (K, K), check_invariants=False, is_coalesced=True)

    def graph_input(self, name):
        """What the encoder of graph `name` takes: the GCN's normalised adjacency, or the GAT's edges [2,E]."""
        return getattr(self, f"{name}_edges") if self.graph_cfg.gnn == "gat" else self.adjacency(name)

    # --- graph terms

    def node_representations(self):
        """Graph encoder (GCN or GAT) outputs over the codebook: dict name -> [K,dim] (float32)."""
        codes = self.token_emb.word_embeddings.weight[: self.cfg.codebook_size].float()  # C [K,dim]
        reps = {}
        with torch.autocast(codes.device.type, enabled=False):  # sparse matmul in float32
            if self.graph_cfg.use_co:
                reps["co"] = self.graph_layer.co_graph_layer(codes, self.graph_input("co"))
            if self.graph_cfg.use_sim:
                reps["sim"] = self.graph_layer.re_graph_layer(codes, self.graph_input("sim"))
        return reps

    def class_prior(self, class_ids):
        """P [B,L,dim] = G_p[class] @ Conv1x1(C) for class ids [B]; zero for the null class.

        Row by row, repeated classes included: no shape depends on the ids, so no host read on a GPU (the
        sampler's FusionCache computes each distinct class once, before decoding).
        """
        codes = self.token_emb.word_embeddings.weight[: self.cfg.codebook_size]
        projected = self.graph_layer.pos_neg_codebook_graph_layer(codes)  # [K,dim]
        real = class_ids < self.cfg.num_classes  # [B]
        occurs = unpack_occurrence_torch(self.occurrence_bits[class_ids.clamp(max=self.cfg.num_classes - 1)],
                                         self.cfg.codebook_size)  # [B,L,K]
        rows = incompatibility_rows(occurs, projected.dtype) * real[:, None, None]  # null class -> 0
        return rows @ projected  # [B,L,dim]

    def fusion_tables(self):
        """[P,K+1,dim] (differentiable): zero_convs[p] over both positive graphs' GCN outputs, per token id.

        Row K (the [MASK] id) is zero, so a gather gives masked places no positive term. One [K,dim] x [dim,dim]
        product per point replaces the two per-token convs: conv(co[ids]) + conv(sim[ids]) = (W(co+sim) + 2b)[ids].
        None when both positive graphs are off.
        """
        with torch.autocast(self.token_emb.word_embeddings.weight.device.type, enabled=False):
            reps = self.node_representations()
            pos = [reps[k] for k in ("co", "sim") if k in reps]
            if not pos:
                return None
            weight, bias = stacked_convs(self.graph_layer.zero_convs)  # [P,dim,dim], [P,dim]
            tables = sum(pos) @ weight.transpose(1, 2) + len(pos) * bias[:, None]  # [P,K,dim]
            return F.pad(tables, (0, 0, 0, 1))  # + the zero [MASK] row: [P,K+1,dim]

    def negative_terms(self, class_ids):
        """negative(point, dtype) -> zero_convs_pos[point](P) [B,L,dim] for class ids [B]; None without G_p."""
        if not self.graph_cfg.use_incompat:
            return None
        prior = self.class_prior(class_ids)  # [B,L,dim]
        convs = self.graph_layer.zero_convs_pos
        return lambda point, dtype: conv1x1(convs[point], prior.to(dtype))

    def fused_injection(self, ids, tables, negative):
        """inject(j, x): x[:, 1:] += tables[point][ids] - negative(point); the class position is unchanged.

        Block j (forward order) uses the convs of point P-1-j: the released weights index them from the output.
        """
        last = self.graph_layer.num_points - 1

        def inject(j, h):  # h [B,1+L,dim]
            point = last - j
            term = F.embedding(ids, tables[point]) if tables is not None else None  # [B,L,dim]
            if negative is not None:
                term = -negative(point, h.dtype) if term is None else term.sub_(negative(point, h.dtype))
            if term is None:
                return h
            return torch.cat([h[:, :1], h[:, 1:] + term.to(h.dtype)], dim=1)

        return inject

    def forward(self, ids, class_ids):
        """(ids [B,L] with [MASK] = K, class ids [B]) -> logits [B,L,K]; exact and differentiable."""
        self.require_graphs()
        class_ids = class_ids.view(-1)
        inject = self.fused_injection(ids, self.fusion_tables(), self.negative_terms(class_ids))
        return self.head(self.forward_blocks(self.embed(ids, class_ids), inject))
