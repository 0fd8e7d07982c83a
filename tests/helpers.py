"""Small builders shared by the tests, and the per-token KA-MIG arithmetic used as the oracle of the model."""
from pathlib import Path

import torch
import torch.nn.functional as F

from libs.checkpoint import load_strict
from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.ka_mig import KAMIG, GraphConfig, conv1x1
from libs.models.vqgan import VQGAN, VQGANConfig

# copies of ../shared/compat (tensor manifests and the two released graph files), so CI needs nothing else
COMPAT = Path(__file__).resolve().parent / "compat"
OFFICIAL_GRAPHS = COMPAT / "official_graph_prior"


def tiny_vqgan(codebook_size=32, seed=0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, embed_dim=8,
                             codebook_size=codebook_size, resolution=8, norm_groups=4)).eval()


def tiny_backbone(codebook_size=32, seq_len=16, num_classes=4, seed=0, **kw) -> AutoNAT:
    torch.manual_seed(seed)
    cfg = dict(codebook_size=codebook_size, seq_len=seq_len, num_classes=num_classes, embed_dim=32,
               depth=4, num_heads=2, dropout=0.0)
    cfg.update(kw)
    return AutoNAT(AutoNATConfig(**cfg)).eval()


def manifest(module) -> list:
    """name<TAB>shape<TAB>dtype lines in state_dict order, as in shared/compat/*.txt."""
    return [f"{k}\t{'x'.join(map(str, v.shape))}\t{str(v.dtype).replace('torch.', '')}"
            for k, v in module.state_dict().items()]


def read_manifest(name) -> list:
    return [l for l in (COMPAT / name).read_text().splitlines() if l and not l.startswith("#")]


def patch_feature_extractor(monkeypatch, loader):
    """Replaces load_feature_extractor wherever the in-process scripts and libs import it."""
    import generate_npz
    from libs.evaluation import inception
    from libs.training import periodic_fid
    for module in (inception, generate_npz, periodic_fid):
        monkeypatch.setattr(module, "load_feature_extractor", loader)


# ----------------------------------------------------------------------------- tiny KA-MIG

K, L, C = 32, 16, 4  # codebook, tokens, classes of the tiny KA-MIG


def random_graph(num_nodes, n_edges, seed, self_loops):
    """(edge_index [2,E], edge_weight [E]) of a seeded random graph, with or without some self-loops."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, num_nodes, (2, n_edges), generator=g)
    if self_loops:
        loops = torch.arange(0, num_nodes, 2)
        index = torch.cat([index, torch.stack([loops, loops])], 1)
    else:
        index = index[:, index[0] != index[1]]
    return index, torch.rand(index.shape[1], generator=g) + 0.1


def random_occurrence(seed, classes=C, seq_len=L, K=K):
    """(occurs bool [C,L,K], packed uint8 [C,L,ceil(K/8)]) with one (class, position) where every token occurs."""
    g = torch.Generator().manual_seed(seed)
    occurs = torch.rand(classes, seq_len, K, generator=g) < 0.6
    occurs[0, 0] = True
    padded = torch.zeros(classes, seq_len, (K + 7) // 8 * 8, dtype=torch.bool)
    padded[..., :K] = occurs
    weights = 2 ** torch.arange(8)
    packed = (padded.view(classes, seq_len, -1, 8).long() * weights).sum(-1).to(torch.uint8)
    return occurs, packed


def tiny_graphs(seed=0):
    return dict(co=random_graph(K, 120, seed, True), sim=random_graph(K, 60, seed + 1, False),
                incompat=random_occurrence(seed)[1])


def tiny_ka_mig(graph_cfg=None, seed=0):
    """(KA-MIG in eval mode, the tiny backbone it was loaded from); fusion convs still zero."""
    backbone = tiny_backbone(seed=seed)
    model = KAMIG(backbone.cfg, graph_cfg or GraphConfig(), tiny_graphs())
    missing = load_strict(model, backbone.state_dict(), allow_missing=("graph_layer.",))
    assert missing and all(k.startswith("graph_layer.") for k in missing)
    return model.eval(), backbone


def randomise_fusion(model, seed=1):
    """Seeded N(0, 0.1) values for every graph-layer parameter (so the fusion terms are non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.graph_layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- per-token oracle

def graph_features(model: KAMIG, ids, class_ids) -> dict:
    """Per-token graph inputs of the fusion, as the paper writes them: GCN rows gathered at the ids
    ([MASK] -> zero row), the class prior, and the not-masked indicator, each [B,L,dim] ([B,L,1])."""
    reps = model.node_representations()
    not_masked = (ids != model.mask_token_id)[..., None]  # [B,L,1]
    safe = ids.clamp(max=model.cfg.codebook_size - 1)
    feats = {name: table[safe] * not_masked.to(table.dtype) for name, table in reps.items()}
    feats["prior"] = model.class_prior(class_ids.view(-1)) if model.graph_cfg.use_incompat else None
    feats["not_masked"] = not_masked
    return feats


def injection(model: KAMIG, j: int, feats: dict, dtype):
    """Fusion term added before block j, [B,1+L,dim]: every 1x1 conv applied on every token (zero class row)."""
    point = model.graph_layer.num_points - 1 - j
    term = 0.0
    mask = feats["not_masked"].to(dtype)
    for name in ("sim", "co"):
        if feats.get(name) is not None:
            term = term + conv1x1(model.graph_layer.zero_convs[point], feats[name].to(dtype)) * mask
    if feats["prior"] is not None:
        term = term - conv1x1(model.graph_layer.zero_convs_pos[point], feats["prior"].to(dtype))
    return F.pad(term, (0, 0, 1, 0)) if torch.is_tensor(term) else None


def reference_forward(model: KAMIG, ids, class_ids):
    """Logits [B,L,K] of KA-MIG computed the paper's way: the oracle of the model's table forward."""
    feats = graph_features(model, ids, class_ids)

    def inject(j, h):
        term = injection(model, j, feats, h.dtype)
        return h if term is None else h + term

    return model.head(model.forward_blocks(model.embed(ids, class_ids), inject))
