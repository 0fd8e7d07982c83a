"""The GAT encoder (graph.gnn = "gat"): our layer against torch_geometric's GATConv, and KA-MIG built with it."""

import ml_collections
import pytest
import torch

from libs.checkpoint import load_strict
from libs.graphs.files import load_edge_graph
from libs.models.factory import build_model, graph_config
from libs.models.fusion_cache import FusionCache
from libs.models.gat import GAT, GATConv, gat_edges
from libs.models.ka_mig import GraphConfig, KAMIG
from tests.helpers import K, L, OFFICIAL_GRAPHS, random_graph, randomise_fusion, tiny_backbone, tiny_graphs


def pyg_gat(ours: GATConv):
    """torch_geometric's GATConv (the test-only oracle) holding our layer's weights."""
    from torch_geometric.nn import GATConv as PygGATConv
    conv = PygGATConv(ours.lin.in_features, ours.lin.out_features)
    conv.load_state_dict(ours.state_dict(), strict=True)  # same parameter names and shapes
    return conv


def test_parameter_names_are_torch_geometric_s():
    from torch_geometric.nn import GATConv as PygGATConv
    ours, theirs = GATConv(8, 4), PygGATConv(8, 4)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sorted(ours.state_dict()) == ["att_dst", "att_src", "bias", "lin.weight"]
    ours.load_state_dict(theirs.state_dict(), strict=True)  # and back


@pytest.mark.parametrize("self_loops", [True, False])
def test_gat_layer_equals_torch_geometric_with_gradients(self_loops):
    torch.manual_seed(0)
    ours = GATConv(16, 8)
    torch.nn.init.normal_(ours.bias)
    theirs = pyg_gat(ours)
    index, weight = random_graph(40, 300, 5, self_loops)
    index = torch.cat([index, index[:, :7]], 1)  # duplicate edges count twice in both
    x = torch.randn(40, 16, requires_grad=True)
    out = ours(x, gat_edges(index, 40))
    expected = theirs(x, index)  # edge weights are not an input of GATConv
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    target = torch.randn_like(out)
    gx_ours, *g_ours = torch.autograd.grad((out * target).sum(), [x, *ours.parameters()])
    gx_theirs, *g_theirs = torch.autograd.grad((expected * target).sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(gx_ours, gx_theirs, atol=1e-5, rtol=0)
    by_name = dict(zip([n for n, _ in theirs.named_parameters()], g_theirs))
    for (name, _), g in zip(ours.named_parameters(), g_ours):
        torch.testing.assert_close(g, by_name[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl"])
def test_gat_layer_equals_torch_geometric_on_released_graphs(name):
    index, _, _ = load_edge_graph(OFFICIAL_GRAPHS / name)
    torch.manual_seed(0)
    ours = GATConv(64, 64)
    torch.nn.init.normal_(ours.bias)
    x = torch.randn(1024, 64)
    torch.testing.assert_close(ours(x, gat_edges(index, 1024)), pyg_gat(ours)(x, index), atol=1e-5, rtol=0)


def test_gat_stack_relu_between_layers_and_mean_of_outputs():
    torch.manual_seed(1)
    stack = GAT(12, 3)
    assert [n for n, _ in stack.named_children()] == ["gat1", "gat2", "gat3"]
    index, _ = random_graph(20, 80, 2, False)
    x = torch.randn(20, 12)
    layers = [pyg_gat(getattr(stack, f"gat{i}")) for i in (1, 2, 3)]
    h1 = torch.relu(layers[0](x, index))
    h2 = torch.relu(layers[1](h1, index))
    h3 = layers[2](h2, index)  # no ReLU after the last layer
    torch.testing.assert_close(stack(x, gat_edges(index, 20)), (h1 + h2 + h3) / 3, atol=1e-5, rtol=0)


def tiny_gat_ka_mig():
    backbone = tiny_backbone()
    model = KAMIG(backbone.cfg, GraphConfig(gnn="gat"), tiny_graphs())
    load_strict(model, backbone.state_dict(), allow_missing=("graph_layer.",))
    return model.eval(), backbone


def test_ka_mig_with_gat_encodes_graphs_with_our_layers_and_starts_as_the_backbone():
    model, backbone = tiny_gat_ka_mig()
    names = model.state_dict()
    assert "graph_layer.co_graph_layer.gat3.att_src" in names and "graph_layer.re_graph_layer.gat1.lin.weight" in names
    assert not any(".conv1." in k for k in names if "graph_layer.co_graph_layer" in k)
    ids = torch.randint(0, K + 1, (4, L))
    cls = torch.tensor([0, 1, 4, 2])
    assert torch.equal(model(ids, cls), backbone(ids, cls))  # zero fusion convs: exactly the backbone
    randomise_fusion(model)
    reps = model.node_representations()
    codes = model.token_emb.word_embeddings.weight[:K]
    index = torch.as_tensor(tiny_graphs()["co"][0])
    layers = [pyg_gat(getattr(model.graph_layer.co_graph_layer, f"gat{i}")) for i in (1, 2, 3)]
    h1 = torch.relu(layers[0](codes, index))
    h2 = torch.relu(layers[1](h1, index))
    torch.testing.assert_close(reps["co"], (h1 + h2 + layers[2](h2, index)) / 3, atol=1e-5, rtol=0)
    with torch.no_grad():
        out = model(ids, cls)
        torch.testing.assert_close(FusionCache(model)(ids, cls), out, atol=1e-5, rtol=0)
    assert not torch.equal(out, backbone(ids, cls))


def test_factory_and_configs_choose_the_encoder():
    from configs import ka_mig_l, tiny
    assert ka_mig_l.get_config().graph.gnn == "gcn"
    config = tiny.get_config()
    config.graph.gnn = "gat"
    assert graph_config(config.graph).gnn == "gat"
    model = build_model(config, "ka_mig", graphs=tiny_graphs())
    assert isinstance(model.graph_layer.co_graph_layer, GAT)
    old = ml_collections.ConfigDict(dict(use_co=True, use_sim=True, use_incompat=True, gcn_layers=3))
    assert graph_config(old).gnn == "gcn"  # a config written before the key: the released GCN
    config.graph.gnn = "sage"
    with pytest.raises(ValueError, match="unknown graph encoder"):
        build_model(config, "ka_mig", graphs=tiny_graphs())
