"""Graph attention encoder, an alternative to the GCN of KA-MIG (`config.graph.gnn = "gat"`).

`GATConv` computes what torch_geometric's `GATConv(in, out)` computes with its defaults (one head, concat,
negative slope 0.2, no dropout, self-loops: existing ones removed, one added per node, edge weights ignored)
and saves its parameters under the same names (`lin.weight`, `att_src`, `att_dst`, `bias`), so weights move
between the two unchanged. It needs no torch_geometric at run time.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gat_edges(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[2,E'] (source, target) as GATConv uses them: the graph's edges without self-loops, then one self-loop per
    node 0..num_nodes-1. Edge weights play no part in attention; duplicate edges stay (each counts)."""
    src, dst = edge_index[0].long(), edge_index[1].long()
    keep = src != dst
    nodes = torch.arange(num_nodes, device=src.device)
    return torch.stack([torch.cat([src[keep], nodes]), torch.cat([dst[keep], nodes])])


def edge_softmax(scores: torch.Tensor, target: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of edge scores [E] over the edges entering each node (as torch_geometric.utils.softmax)."""
    top = torch.full((num_nodes,), -math.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, target, scores.detach(), reduce="amax", include_self=True)
    e = (scores - top[target]).exp()
    total = torch.zeros(num_nodes, dtype=scores.dtype, device=scores.device).index_add_(0, target, e)
    return e / (total[target] + 1e-16)


class GATConv(nn.Module):
    """One-head graph attention: h = x W^T; alpha_ij = softmax_i(leaky_relu(a_src.h_j + a_dst.h_i, 0.2)) over the
    sources j of each target i; out_i = sum_j alpha_ij h_j + b."""

    negative_slope = 0.2

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, 1, out_dim))  # [1, heads, out] as torch_geometric
        self.att_dst = nn.Parameter(torch.empty(1, 1, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.lin.weight)  # glorot, as torch_geometric
        for att in (self.att_src, self.att_dst):  # torch_geometric's glorot on [1, 1, out]
            bound = math.sqrt(6.0 / (att.shape[-2] + att.shape[-1]))
            nn.init.uniform_(att, -bound, bound)

    def forward(self, x, edges):  # x [N,in], edges [2,E] (source, target) from gat_edges -> [N,out]
        h = self.lin(x)  # [N,out]
        src, dst = edges[0], edges[1]
        a_src = h @ self.att_src.view(-1)  # [N]
        a_dst = h @ self.att_dst.view(-1)
        alpha = edge_softmax(F.leaky_relu(a_src[src] + a_dst[dst], self.negative_slope), dst, h.shape[0])  # [E]
        out = torch.zeros_like(h).index_add_(0, dst, alpha[:, None] * h[src])
        return out + self.bias


class GAT(nn.Module):
    """Stack of GAT layers gat1, gat2, ... with ReLU after every layer but the last; a node's representation is the
    mean of the layer outputs (the GAT encoder the KA-MIG paper describes next to its GCN)."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"gat{i + 1}", GATConv(dim, dim))
        self.layers = layers

    def forward(self, x, edges):  # x [K,dim], edges [2,E] -> [K,dim]
        outs = []
        for i in range(self.layers):
            x = getattr(self, f"gat{i + 1}")(x, edges)
            if i < self.layers - 1:
                x = F.relu(x)
            outs.append(x)
        return torch.stack(outs).mean(0)
