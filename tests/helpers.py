"""Small builders shared by the tests, and the per-token KA-MIG arithmetic used as the oracle of the model."""
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from libs.checkpoint import load_strict
from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.ka_mig import KAMIG, GraphConfig, conv1x1
from libs.models.vqgan import VQGAN, VQGANConfig

REPO = Path(__file__).resolve().parents[1]
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


def write_reference_stats(path, extractor, n=8, seed=0):
    """Writes FID reference statistics of n seeded random 8x8 images to path and returns path."""
    from libs.evaluation.fid_stats import compute_reference_stats, save_reference_stats
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    save_reference_stats(path, compute_reference_stats(images, extractor, batch_size=8, progress=False))
    return path


# ----------------------------------------------------------------------------- image folders

IMAGE_TREE_CLASSES = ["n01", "n02", "n03"]  # class folders of make_image_tree


def random_rgb(rng, h, w):
    """uint8 [h,w,3] noise."""
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_image_tree(root: Path):
    """data/train/<class>/...: 9 readable images (sizes, modes L/RGBA/P vary), 2 corrupt files, 1 non-image."""
    rng = np.random.default_rng(0)
    train = root / "train"
    for c in reversed(IMAGE_TREE_CLASSES):  # created out of order: labels must follow sorted names
        (train / c).mkdir(parents=True)
    Image.fromarray(random_rgb(rng, 20, 12)).save(train / "n01/a.JPEG", quality=95)
    Image.fromarray(random_rgb(rng, 31, 15)).convert("RGBA").save(train / "n01/b.png")
    Image.fromarray(random_rgb(rng, 9, 9)[..., 0], mode="L").save(train / "n01/c.jpg")  # grayscale
    Image.fromarray(random_rgb(rng, 64, 40)).save(train / "n02/a.JPEG")
    (train / "n02/broken.JPEG").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    Image.fromarray(random_rgb(rng, 17, 33)).convert("P").save(train / "n02/c.png")  # palette
    Image.fromarray(random_rgb(rng, 12, 12)).save(train / "n02/d.jpeg")
    (train / "n02/notes.txt").write_text("not an image")
    for name in ("a.JPEG", "b.JPEG", "c.JPEG"):
        Image.fromarray(random_rgb(rng, 16, 24)).save(train / "n03" / name)
    buf = io.BytesIO()
    Image.fromarray(random_rgb(rng, 64, 64)).save(buf, format="JPEG")
    (train / "n03/truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


# ----------------------------------------------------------------------------- token datasets and graph CLI


def write_random_token_dir(path, N=120, grid=4, K=40, C=5, seed=0):
    """Writes a token dataset of N seeded uniform random rows (K codes, C classes) to path; returns (tokens, labels)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, K, size=(N, grid * grid)).astype(np.uint16)
    labels = rng.integers(0, C, size=N).astype(np.int64)
    path.mkdir(parents=True)
    np.save(path / "tokens.npy", tokens)
    np.save(path / "labels.npy", labels)
    meta = {"codebook_size": K, "grid": grid, "seq_len": grid * grid, "num_classes": C, "num_rows": N}
    (path / "meta.json").write_text(json.dumps(meta))
    return tokens, labels


def load_build_graphs_cli():
    """graph_construction/build_graphs.py imported as a module (nothing may run at import)."""
    spec = importlib.util.spec_from_file_location("build_graphs", REPO / "graph_construction" / "build_graphs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # nothing may run at import
    return module


# ----------------------------------------------------------------------------- tiny training runs


def synthetic_tokens(n=512, seed=0):
    """Class c uses codes 8c..8c+7, and position p prefers (p mod 8): learnable structure."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    noise = rng.integers(0, 8, (n, 16))
    pattern = np.arange(16) % 8
    tokens = np.where(rng.random((n, 16)) < 0.7, pattern, noise) + labels[:, None] * 8
    return tokens.astype(np.uint16), labels.astype(np.int64)


def write_training_token_dir(path, n=512):
    """Writes n rows of synthetic_tokens as a full token dataset (configs/tiny.py sizes) to path; returns path."""
    tokens, labels = synthetic_tokens(n)
    path.mkdir(parents=True)
    np.save(path / "tokens.npy", tokens)
    np.save(path / "labels.npy", labels)
    meta = dict(codebook_size=32, grid=4, seq_len=16, num_classes=4, resolution=8, class_names=list("abcd"),
                num_images=n, rows_per_image=1, skipped=[])
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def tiny_config(tmp_path, mode="pretrain", **train):
    """configs/tiny.py writing under tmp_path/out, in the given training mode, with train.* overrides."""
    from configs import tiny
    config = tiny.get_config()
    config.output_dir = str(tmp_path / "out")
    config.train.mode = mode
    config.train.log_interval = 1000
    for k, v in train.items():
        config.train[k] = v
    return config


def ka_mig_trainer(tmp_path, **train):
    """(ka_mig-mode Trainer on synthetic_tokens and tiny_graphs, the 2-block backbone it starts from)."""
    from libs.training.trainer import Trainer
    config = tiny_config(tmp_path, "ka_mig", **train)
    backbone = tiny_backbone(depth=2)
    path = tmp_path / "backbone.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), path)
    config.train.init_checkpoint = str(path)
    tokens, labels = synthetic_tokens()
    return Trainer(config, tokens, labels, graphs=tiny_graphs()), backbone


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


# ----------------------------------------------------------------------------- decoding options


def token_model(kind: str, graph_cfg=None, **maskgit):
    """A tiny token model on the CPU: the bare backbone ('autonat', 'maskgit'), or with the graphs and non-zero
    fusion ('ka_mig', 'ka_maskgit'). `maskgit`: MaskGITConfig fields over tiny_maskgit_config's."""
    if kind == "autonat":
        return tiny_backbone()
    if kind in ("maskgit", "ka_maskgit"):
        from libs.models.ka_maskgit import KAMaskGIT
        from libs.models.maskgit import MaskGIT
        torch.manual_seed(0)
        cfg = tiny_maskgit_config(**maskgit)
        if kind == "maskgit":
            return MaskGIT(cfg).eval()
        model = KAMaskGIT(cfg, graph_cfg or GraphConfig(), tiny_graphs()).eval()
    else:
        model, _ = tiny_ka_mig(graph_cfg)
    randomise_fusion(model)
    return model


def tiny_maskgit_config(**kw):
    """MaskGITConfig of configs/tiny_maskgit.py's sizes (3 layers, no dropout unless given)."""
    from libs.models.maskgit import MaskGITConfig
    cfg = dict(codebook_size=K, seq_len=16, num_classes=4, embed_dim=32, depth=3, num_heads=2, dropout=0.0)
    return MaskGITConfig(**{**cfg, **kw})


def decoding_options() -> dict:
    """name -> Schedule: every schedule / order / guidance option of the samplers (maskgit at T = 4, the AutoNAT
    T = 8 strategy of configs/ka_mig_l.py)."""
    import dataclasses
    from configs import ka_mig_l
    from libs.sampling.decoding import maskgit_schedule, parse_guidance_steps, restrict_guidance, schedule_from_config
    autonat = schedule_from_config(ka_mig_l.get_config().sample)
    maskgit = maskgit_schedule(4, 2.0)
    keep = parse_guidance_steps("1-2", 4)
    return {
        "autonat": autonat,
        "autonat-halton": dataclasses.replace(autonat, order="halton"),
        "maskgit-linear": maskgit,
        "maskgit-constant": maskgit_schedule(4, 2.0, guidance_schedule="constant"),
        "maskgit-pow-cosine": maskgit_schedule(4, 2.0, guidance_schedule="pow-cosine", guidance_power=2.0),
        "maskgit-halton": dataclasses.replace(maskgit, order="halton"),
        "maskgit-guidance-steps": dataclasses.replace(maskgit, guidance=restrict_guidance(maskgit.guidance, keep)),
    }
