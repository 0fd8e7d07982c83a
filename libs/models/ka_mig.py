"""KA-MIG: graph-aware token encoder fused into every block of an AutoNAT backbone (SPEC §6)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.graphs.recipes import incompatibility_rows, unpack_occurrence_torch


@dataclass
class GraphConfig:
    """Which graphs are used and the GCN sizes; defaults are the released KA-MIG model."""
    use_co: bool = True          # token co-occurrence G_co (positive)
    use_sim: bool = True         # token semantic similarity G_s (positive)
    use_incompat: bool = True    # per-class position-token incompatibility G_p (negative)
    gcn_layers: int = 3
    gcn_hidden: int = 768


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

    def __init__(self, dim, hidden, layers):
        super().__init__()
        for i in range(layers):
            self.add_module(f"conv{i + 1}", GCNConv(dim if i == 0 else hidden, hidden))
        self.layers = layers

    def forward(self, x, adj):  # x [K,dim] -> [K,hidden]
        outs = []
        for i in range(self.layers):
            x = F.relu(getattr(self, f"conv{i + 1}")(x, adj))
            outs.append(x)
        return torch.stack(outs).mean(0)


class NegativePrior(nn.Module):
    """P = G_p[class] @ Conv1x1(C): the 1/|I|-weighted mean of the projected incompatible codes."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 1)

    def project(self, codes):  # codes [K,dim] -> [K,dim]
        return F.linear(codes, self.conv1.weight[:, :, 0], self.conv1.bias)


def zero_conv(dim) -> nn.Conv1d:
    conv = nn.Conv1d(dim, dim, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(conv: nn.Conv1d, x):  # x [B,L,dim] -> [B,L,dim]; a Conv1d(k=1) over the token axis
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


# ----------------------------------------------------------------------------- graph layer


class GraphLayer(nn.Module):
    """The graph-aware encoder: GCNs over G_co / G_s, the G_p prior, and 1x1 fusion convs per block."""

    def __init__(self, dim: int, num_points: int, cfg: GraphConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.use_co:
            self.co_graph_layer = GCN(dim, cfg.gcn_hidden, cfg.gcn_layers)
        if cfg.use_sim:
            self.re_graph_layer = GCN(dim, cfg.gcn_hidden, cfg.gcn_layers)
        if cfg.use_incompat:
            self.pos_neg_codebook_graph_layer = NegativePrior(dim)
        if cfg.use_co or cfg.use_sim:  # one conv per point, shared by the two positive graphs
            self.zero_convs = nn.ModuleList(zero_conv(dim) for _ in range(num_points))
        if cfg.use_incompat:
            self.zero_convs_pos = nn.ModuleList(zero_conv(dim) for _ in range(num_points))
        self.num_points = num_points


@dataclass
class GraphFeatures:
    """Per-batch graph inputs to the fusion, each [B,L,dim] or None when that graph is off."""
    co: Optional[torch.Tensor]
    sim: Optional[torch.Tensor]
    prior: Optional[torch.Tensor]
    not_masked: torch.Tensor  # [B,L,1]


class KAMIG(AutoNAT):
    """AutoNAT + knowledge graphs: x <- x + sim_term + co_term - prior_term before every block."""

    def __init__(self, cfg: AutoNATConfig = None, graph_cfg: GraphConfig = None, graphs: dict = None):
        super().__init__(cfg)
        self.graph_cfg = graph_cfg or GraphConfig()
        if self.graph_cfg.gcn_hidden != self.cfg.embed_dim:
            raise ValueError(f"graph.gcn_hidden ({self.graph_cfg.gcn_hidden}) must equal model.embed_dim "
                             f"({self.cfg.embed_dim}): the GCN outputs are added to the token stream")
        self.graph_layer = GraphLayer(self.cfg.embed_dim, len(self.blocks), self.graph_cfg)
        self.has_graphs = False
        if graphs is not None:
            self.set_graphs(**graphs)

    # --- graphs (non-persistent buffers, moved with the module, never inside forward)

    def set_graphs(self, co=None, sim=None, incompat=None):
        """co/sim: (edge_index [2,E], edge_weight [E]); incompat: packed occurrence bits uint8 [C,L,ceil(K/8)]."""
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
            index, weight = gcn_norm(torch.as_tensor(edge_index), torch.as_tensor(edge_weight), K)
            self.register_buffer(f"{name}_adj_index", index.to(device), persistent=False)
            self.register_buffer(f"{name}_adj_weight", weight.to(device), persistent=False)
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

    def adjacency(self, name):
        index, weight = getattr(self, f"{name}_adj_index"), getattr(self, f"{name}_adj_weight")
        K = self.cfg.codebook_size
        return torch.sparse_coo_tensor(index, weight, (K, K), check_invariants=False).coalesce()

    # --- graph features

    def node_representations(self):
        """GCN outputs over the codebook: dict name -> [K,dim] (float32)."""
        codes = self.token_emb.word_embeddings.weight[: self.cfg.codebook_size].float()  # C [K,dim]
        reps = {}
        with torch.autocast(codes.device.type, enabled=False):  # sparse matmul in float32
            if self.graph_cfg.use_co:
                reps["co"] = self.graph_layer.co_graph_layer(codes, self.adjacency("co"))
            if self.graph_cfg.use_sim:
                reps["sim"] = self.graph_layer.re_graph_layer(codes, self.adjacency("sim"))
        return reps

    def class_prior(self, class_ids):
        """P [B,L,dim] = G_p[class] @ Conv1x1(C); zero for the null class."""
        codes = self.token_emb.word_embeddings.weight[: self.cfg.codebook_size]
        projected = self.graph_layer.pos_neg_codebook_graph_layer.project(codes)  # [K,dim]
        classes, inverse = class_ids.unique(return_inverse=True)  # compute each class once
        real = classes < self.cfg.num_classes
        occurs = unpack_occurrence_torch(self.occurrence_bits[classes.clamp(max=self.cfg.num_classes - 1)],
                             self.cfg.codebook_size)  # [U,L,K]
        rows = incompatibility_rows(occurs, projected.dtype) * real[:, None, None]  # null class -> 0
        return (rows @ projected)[inverse]  # [B,L,dim]

    def graph_features(self, ids, class_ids, reps=None, prior=None) -> GraphFeatures:
        """Gathers node representations at the input ids ([MASK] -> zero row) and the class prior."""
        self.require_graphs()
        reps = self.node_representations() if reps is None else reps
        K = self.cfg.codebook_size
        not_masked = (ids != self.mask_token_id)[..., None]  # [B,L,1]
        safe = ids.clamp(max=K - 1)

        def gather(table):  # [K,dim] -> [B,L,dim] with masked places zeroed
            return table[safe] * not_masked.to(table.dtype)

        co = gather(reps["co"]) if "co" in reps else None
        sim = gather(reps["sim"]) if "sim" in reps else None
        if self.graph_cfg.use_incompat:
            prior = self.class_prior(class_ids.view(-1)) if prior is None else prior
        else:
            prior = None
        return GraphFeatures(co, sim, prior, not_masked)

    def injection(self, j: int, feats: GraphFeatures, dtype) -> torch.Tensor:
        """Fusion term added before block j: [B,1+L,dim] (zeros at the class position)."""
        point = self.graph_layer.num_points - 1 - j  # point j uses conv index 24-j
        term = 0.0
        mask = feats.not_masked.to(dtype)
        if feats.sim is not None:
            term = term + conv1x1(self.graph_layer.zero_convs[point], feats.sim.to(dtype)) * mask
        if feats.co is not None:
            term = term + conv1x1(self.graph_layer.zero_convs[point], feats.co.to(dtype)) * mask
        if feats.prior is not None:
            term = term - conv1x1(self.graph_layer.zero_convs_pos[point], feats.prior.to(dtype))
        if not torch.is_tensor(term):
            return None
        return F.pad(term, (0, 0, 1, 0))  # class position gets zeros

    def forward(self, ids, class_ids, feats: GraphFeatures = None):
        x = self.embed(ids, class_ids)
        if feats is None and self.use_inference_cache and not self.training and not torch.is_grad_enabled():
            inject = self.cached_injection(ids, class_ids.view(-1))  # same numbers, a fraction of the work
        elif feats is None and self.use_fusion_tables:
            inject = self.table_injection(ids, class_ids.view(-1))  # same numbers, differentiable
        else:  # the paper's arithmetic: every fusion conv on every token (the oracle of the two paths above)
            feats = self.graph_features(ids, class_ids) if feats is None else feats

            def inject(j, h):
                term = self.injection(j, feats, h.dtype)
                return h if term is None else h + term

        return self.head(self.forward_blocks(x, inject))

    # --- fusion tables: zero_convs[p] applied to the K node representations once, then gathered per token.
    # conv(co[ids]) + conv(sim[ids]) == (W(co + sim) + 2b)[ids], so the per-token convs of the positive
    # graphs (two [B*L,dim] x [dim,dim] matmuls per block) become one [K,dim] x [dim,dim] per block.

    use_fusion_tables = True

    def fusion_tables(self):
        """[points,K+1,dim] (differentiable): zero_convs[p] over both positive graphs' GCN outputs per token id,
        row K (the [MASK] id) zero; None when both positive graphs are off."""
        with torch.autocast(self.token_emb.word_embeddings.weight.device.type, enabled=False):
            reps = self.node_representations()
            pos = [reps[k] for k in ("co", "sim") if k in reps]
            if not pos:
                return None
            summed = sum(pos)  # [K,dim]; the two graphs share each point's conv
            convs = self.graph_layer.zero_convs
            weight = torch.stack([c.weight[:, :, 0] for c in convs]).float()  # [P,dim,dim]
            bias = torch.stack([c.bias for c in convs]).float()  # [P,dim]
            tables = summed @ weight.transpose(1, 2) + len(pos) * bias[:, None]  # [P,K,dim]
            return F.pad(tables, (0, 0, 0, 1))  # + a zero row for the [MASK] id: [P,K+1,dim]

    def table_injection(self, ids, class_ids):
        """inject(j, x) of the training path: table lookups for the positive graphs, per-token conv of the prior."""
        self.require_graphs()
        prior = self.class_prior(class_ids) if self.graph_cfg.use_incompat else None  # [B,L,dim]

        def negative(point, dtype):  # [B,L,dim]
            return conv1x1(self.graph_layer.zero_convs_pos[point], prior.to(dtype))

        return self.lookup_injection(ids, self.fusion_tables(), negative if prior is not None else None)

    def lookup_injection(self, ids, tables, negative):
        """inject(j, x): x[:, 1:] += tables[point][ids] - negative(point); the class position is unchanged."""
        last = self.graph_layer.num_points - 1

        def inject(j, h):
            point = last - j  # point j uses conv index 24-j
            term = F.embedding(ids, tables[point]) if tables is not None else None  # [B,L,dim]
            if negative is not None:
                term = -negative(point, h.dtype) if term is None else term.sub_(negative(point, h.dtype))
            if term is None:
                return h
            return torch.cat([h[:, :1], h[:, 1:] + term.to(h.dtype)], dim=1)

        return inject

    def require_graphs(self):
        """Raises a clear error when set_graphs was never called."""
        if not self.has_graphs:
            raise RuntimeError("KAMIG has no graphs: call set_graphs(...) (see libs.graphs.files loaders)")

    # --- inference fast path: per-weights token tables and per-batch class terms

    use_inference_cache = True

    def weights_version(self):
        """Changes whenever a parameter the tables depend on is modified in place or replaced."""
        params = [self.token_emb.word_embeddings.weight, *self.graph_layer.parameters()]
        return tuple((p.data_ptr(), p._version) for p in params)

    @torch.no_grad()
    def token_tables(self):
        """[points,K+1,dim]: zero_convs[p] folded over both positive graphs' GCN outputs, per token id."""
        cache = self.__dict__.setdefault("_inference_cache", {})
        version = self.weights_version()
        if cache.get("version") != version:
            cache.clear()
            cache["version"] = version
        if "tables" not in cache:
            cache["tables"] = self.fusion_tables()
        return cache["tables"]

    @torch.no_grad()
    def class_terms(self, class_ids):
        """([points,U,L,dim], inverse [B]): zero_convs_pos[p](P_class) for the batch's U distinct classes."""
        cache = self.__dict__["_inference_cache"]
        key = cache.get("class_key")
        if key is None or key.shape != class_ids.shape or not torch.equal(key, class_ids):
            classes, inverse = class_ids.unique(return_inverse=True)
            with torch.autocast(class_ids.device.type, enabled=False):
                prior = self.class_prior(classes).float()  # [U,L,dim]
                convs = self.graph_layer.zero_convs_pos
                weight = torch.stack([c.weight[:, :, 0] for c in convs]).float()  # [P,dim,dim]
                bias = torch.stack([c.bias for c in convs]).float()  # [P,dim]
                terms = torch.einsum("uld,ped->pule", prior, weight) + bias[:, None, None]  # [P,U,L,dim]
            cache.update(class_key=class_ids.clone(), class_terms=(terms, inverse))
        return cache["class_terms"]

    def clear_inference_cache(self):
        self.__dict__.pop("_inference_cache", None)

    def cached_injection(self, ids, class_ids):
        """inject(j, x) of the fast path: one table lookup ([MASK] -> zero row) and one class-term gather."""
        self.require_graphs()
        tables = self.token_tables()  # [P,K+1,dim], row K (the [MASK] id) is zero
        if not self.graph_cfg.use_incompat:
            return self.lookup_injection(ids, tables, None)
        terms, inverse = self.class_terms(class_ids)  # [P,U,L,dim], [B]
        return self.lookup_injection(ids, tables, lambda point, dtype: terms[point].index_select(0, inverse))


def trainable_prefixes(mode: str) -> Tuple[str, ...]:
    """Parameter-name prefixes trained in each mode ('' = everything)."""
    if mode == "ka_mig":
        return ("graph_layer.", "mlm_layer.")
    if mode == "pretrain":
        return ("",)
    raise ValueError(f"unknown train.mode '{mode}' (ka_mig or pretrain)")


def graph_config(graph_cfg) -> GraphConfig:
    """GraphConfig from a config's `graph` block (file paths are ignored)."""
    fields = GraphConfig.__dataclass_fields__
    return GraphConfig(**{k: v for k, v in dict(graph_cfg).items() if k in fields})
