"""KA-MIG model: manifest, zero-init equivalence, GCN vs torch_geometric, gathering, bad graphs."""

import pytest
import torch

from libs.checkpoint import load_state_dict_file, load_strict
from libs.graphs.files import load_edge_graph
from libs.graphs.recipes import incompatibility_rows, unpack_occurrence_torch as unpack_bits
from libs.models.autonat import AutoNAT
from libs.models.fusion_cache import FusionCache
from libs.models.ka_mig import GCNConv, GraphConfig, KAMIG, gcn_norm
from tests.helpers import (K, L, OFFICIAL_GRAPHS, graph_features, injection, manifest, random_graph,
                           random_occurrence, randomise_fusion, read_manifest, reference_forward, tiny_backbone,
                           tiny_graphs, tiny_ka_mig)

def test_full_size_manifest_and_backbone_load():
    with torch.device("meta"):
        model = KAMIG()
        backbone = AutoNAT()
    assert manifest(model) == read_manifest("ka_mig_autonat_l.txt")
    expected_missing = [k for k in model.state_dict() if k.startswith("graph_layer.")]
    own = set(model.state_dict())
    assert [k for k in backbone.state_dict() if k not in own] == []
    assert len(expected_missing) == 428 - 314


def test_zero_initialised_fusion_equals_backbone_exactly():
    model, backbone = tiny_ka_mig()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, K, (8, L), generator=g)
    ids[torch.rand(8, L, generator=g) < 0.5] = K  # with masks
    ids[0] = K
    cls = torch.tensor([0, 1, 2, 3, 4, 4, 0, 2])  # includes the null class
    assert torch.equal(model(ids, cls), backbone(ids, cls))


def test_ka_mig_checkpoint_round_trip_strict(tmp_path):
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    torch.save(model.state_dict(), tmp_path / "graph_nnet_ema.pth")
    other, _ = tiny_ka_mig(seed=3)
    load_strict(other, load_state_dict_file(tmp_path / "graph_nnet_ema.pth"))
    ids, cls = torch.randint(0, K + 1, (2, L)), torch.tensor([1, 4])
    assert torch.equal(model(ids, cls), other(ids, cls))


def pyg_conv(ours, num_nodes):
    from torch_geometric.nn import GCNConv as PygGCNConv
    conv = PygGCNConv(ours.lin.in_features, ours.lin.out_features)
    with torch.no_grad():
        conv.lin.weight.copy_(ours.lin.weight)
        conv.bias.copy_(ours.bias)
    return conv


@pytest.mark.parametrize("self_loops", [True, False])
def test_gcn_layer_equals_torch_geometric_on_random_graphs(self_loops):
    torch.manual_seed(0)
    ours = GCNConv(16, 8)
    torch.nn.init.normal_(ours.bias)
    index, weight = random_graph(40, 300, 5, self_loops)
    x = torch.randn(40, 16)
    adj_index, adj_weight = gcn_norm(index, weight, 40)
    adj = torch.sparse_coo_tensor(adj_index, adj_weight, (40, 40), check_invariants=False).coalesce()
    expected = pyg_conv(ours, 40)(x, index, weight)
    torch.testing.assert_close(ours(x, adj), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl"])
def test_gcn_layer_equals_torch_geometric_on_released_graphs(name):
    index, weight, _ = load_edge_graph(OFFICIAL_GRAPHS / name)
    torch.manual_seed(0)
    ours = GCNConv(64, 64)
    torch.nn.init.normal_(ours.bias)
    x = torch.randn(1024, 64)
    adj_index, adj_weight = gcn_norm(index, weight.float(), 1024)
    adj = torch.sparse_coo_tensor(adj_index, adj_weight, (1024, 1024), check_invariants=False).coalesce()
    expected = pyg_conv(ours, 1024)(x, index, weight.float())
    torch.testing.assert_close(ours(x, adj), expected, atol=1e-5, rtol=0)


def test_mask_gathers_nothing_and_null_class_has_no_prior():
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    ids = torch.randint(0, K, (3, L))
    ids[:, ::2] = K
    cls = torch.tensor([4, 1, 4])
    feats = graph_features(model, ids, cls)
    masked = ids == K
    assert torch.all(feats["co"][masked] == 0) and torch.all(feats["sim"][masked] == 0)
    assert feats["co"][~masked].abs().sum() > 0
    assert torch.all(feats["prior"][cls == 4] == 0) and feats["prior"][1].abs().sum() > 0
    # positive terms vanish at [MASK] places even with non-zero conv biases
    no_prior = KAMIG(model.cfg, GraphConfig(use_incompat=False), tiny_graphs())
    no_prior.load_state_dict(model.state_dict(), strict=False)
    feats = graph_features(no_prior, ids, cls)
    for j in range(len(no_prior.blocks)):
        term = injection(no_prior, j, feats, torch.float32)
        assert torch.all(term[:, 0] == 0)              # class position
        assert torch.all(term[:, 1:][masked] == 0)      # masked places
        assert term[:, 1:][~masked].abs().sum() > 0


def test_prior_rows_from_packed_bits():
    occurs, packed = random_occurrence(2)
    assert torch.equal(unpack_bits(packed, K), occurs)
    rows = incompatibility_rows(occurs)
    sums = rows.sum(-1)
    any_incompat = (~occurs).any(-1)
    torch.testing.assert_close(sums[any_incompat], torch.ones(int(any_incompat.sum())))
    assert torch.all(sums[~any_incompat] == 0)
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    cls = torch.tensor([2, 0, 2, 4])
    projected = model.graph_layer.pos_neg_codebook_graph_layer(model.token_emb.word_embeddings.weight[:K])
    dense = torch.cat([incompatibility_rows(unpack_bits(tiny_graphs()["incompat"], K)), torch.zeros(1, L, K)])
    torch.testing.assert_close(model.class_prior(cls), dense[cls] @ projected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags,absent", [(dict(use_co=False), "co_graph_layer"),
                                          (dict(use_sim=False), "re_graph_layer"),
                                          (dict(use_incompat=False), "zero_convs_pos")])
def test_ablation_switches_remove_modules_and_still_run(flags, absent):
    model, backbone = tiny_ka_mig(GraphConfig(**flags))
    assert not any(absent in k for k in model.state_dict())
    ids, cls = torch.randint(0, K + 1, (2, L)), torch.tensor([0, 4])
    assert torch.equal(model(ids, cls), backbone(ids, cls))
    randomise_fusion(model)
    assert not torch.equal(model(ids, cls), backbone(ids, cls))


def test_graphs_of_the_wrong_size_are_refused():
    backbone = tiny_backbone()
    graphs = tiny_graphs()
    graphs["co"] = random_graph(64, 100, 0, True)
    with pytest.raises(ValueError, match="has 64 nodes.*codebook size is 32"):
        KAMIG(backbone.cfg, GraphConfig(), graphs)
    graphs = tiny_graphs()
    graphs["incompat"] = random_occurrence(0, seq_len=9)[1]
    with pytest.raises(ValueError, match=r"\(4, 9, 4\).*\(4, 16, 4\)"):
        KAMIG(backbone.cfg, GraphConfig(), graphs)
    model = KAMIG(backbone.cfg, GraphConfig())
    with pytest.raises(RuntimeError, match="set_graphs"):
        model(torch.zeros(1, L, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_graph_buffers_are_not_persistent():
    model, _ = tiny_ka_mig()
    assert not any("adj" in k or "occurrence" in k for k in model.state_dict())
    assert any("adj" in name for name, _ in model.named_buffers())


ABLATIONS = [dict(), dict(use_co=False), dict(use_incompat=False), dict(use_co=False, use_sim=False)]


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K + 1, (6, L), generator=g)
    ids[0, :5] = K
    return ids, torch.tensor([0, 1, 2, 4, 4, 3])  # includes the null class (4) twice


@pytest.mark.parametrize("flags", ABLATIONS)
def test_forward_equals_per_token_convs_with_gradients(flags):
    """The model's one forward (convs folded into [K,dim] tables) gives the per-token convs' logits and gradients."""
    model, _ = tiny_ka_mig(GraphConfig(**flags))
    randomise_fusion(model)
    ids, cls = random_batch()
    target = torch.randn(6, L, K)
    results = []
    for forward in (reference_forward, KAMIG.forward):
        model.zero_grad(set_to_none=True)
        out = forward(model, ids, cls)
        (out * target).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("graph_layer.")}
        results.append((out.detach(), grads))
    (reference, ref_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in fast_grads.values())


@pytest.mark.parametrize("flags", ABLATIONS)
def test_fusion_cache_equals_forward(flags):
    model, _ = tiny_ka_mig(GraphConfig(**flags))
    randomise_fusion(model)
    ids, cls = random_batch()
    with torch.no_grad():
        reference = reference_forward(model, ids, cls)
        cache = FusionCache(model)
        fast = cache(ids, cls)
        again = cache(ids, cls)  # class terms reused
        other_classes = cache(ids, cls.flip(0))  # new classes -> new class terms
        torch.testing.assert_close(other_classes, model(ids, cls.flip(0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    assert torch.equal(fast, again)


def test_fusion_cache_after_weight_change_needs_refresh_and_then_equals_forward():
    model, _ = tiny_ka_mig()
    ids, cls = random_batch(1)
    with torch.no_grad():
        cache = FusionCache(model)
        before = cache(ids, cls)
        randomise_fusion(model)  # in-place update, like an optimizer step
        stale = cache(ids, cls)  # positive tables still describe the old (zero) weights
        fresh = model(ids, cls)
        cache.refresh()
        refreshed = cache(ids, cls)
        rebuilt = FusionCache(model)(ids, cls)
    assert not torch.equal(stale, fresh)
    assert torch.equal(before, stale)
    torch.testing.assert_close(refreshed, fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(rebuilt, fresh, atol=1e-5, rtol=0)


def test_fusion_cache_is_never_used_while_training():
    model, _ = tiny_ka_mig()
    cache = FusionCache(model)
    ids, cls = random_batch()
    with pytest.raises(RuntimeError, match="inference"):
        cache(ids, cls)  # gradients on
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="inference"):
        cache(ids, cls)  # training mode
    model(ids, cls).sum().backward()  # the model itself trains as usual
    assert model.graph_layer.zero_convs[0].weight.grad is not None
    with pytest.raises(TypeError, match="KAMIG"):
        FusionCache(tiny_backbone())


def test_cpu_kernel_switch_keeps_ka_mig_logits():
    import copy
    from libs.models.cpu_kernels import OneDNNLinear, apply_cpu_kernels
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    fast = apply_cpu_kernels(copy.deepcopy(model), "onednn")
    assert isinstance(fast.mid_block.mlp.fc1, OneDNNLinear)
    assert type(fast.graph_layer.co_graph_layer.conv1.lin) is torch.nn.Linear  # the GCNs are left alone
    ids, cls = random_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(FusionCache(fast)(ids, cls), FusionCache(model)(ids, cls), atol=1e-5, rtol=0)


def test_fusion_cache_refuses_new_graphs_until_refreshed():
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    ids, cls = random_batch(3)
    cache = FusionCache(model)
    model.set_graphs(**tiny_graphs(seed=5))
    with torch.no_grad(), pytest.raises(RuntimeError, match="refresh"):
        cache(ids, cls)
    cache.refresh()
    with torch.no_grad():
        torch.testing.assert_close(cache(ids, cls), model(ids, cls), atol=1e-5, rtol=0)
