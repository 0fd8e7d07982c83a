"""The knowledge graphs as a plug-in: KA on MaskGIT, the documented host interface on a toy transformer, the
factory's backbones, and a tiny KA-MaskGIT trained by train_graph.py and sampled by generate_img.py."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from libs.checkpoint import load_state_dict_file, load_strict
from libs.config import load_config_file
from libs.errors import BadInput
from libs.models.factory import build_model, default_kind, for_sampling
from libs.models.fusion_cache import FusionCache
from libs.models.ka_maskgit import KAMaskGIT
from libs.models.knowledge import GraphConfig, KnowledgeHost, conv1x1
from libs.models.maskgit import MaskGIT, MaskGITConfig
from tests.helpers import C, K, L, randomise_fusion, tiny_graphs, tiny_vqgan, write_training_token_dir

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_ka_maskgit.py"


def tiny_maskgit(depth=3, dropout=0.0, seed=0) -> MaskGIT:
    torch.manual_seed(seed)
    cfg = MaskGITConfig(codebook_size=K, seq_len=L, num_classes=C, embed_dim=32, depth=depth, num_heads=2,
                        dropout=dropout)
    return MaskGIT(cfg).eval()


def tiny_ka_maskgit(graph_cfg=None, **kw):
    """(KAMaskGIT with zero fusion in eval mode, the MaskGIT it was loaded from)."""
    bare = tiny_maskgit(**kw)
    model = KAMaskGIT(bare.cfg, graph_cfg or GraphConfig(), tiny_graphs())
    missing = load_strict(model, bare.state_dict(), allow_missing=("graph_layer.",))
    assert missing and all(k.startswith("graph_layer.") for k in missing)
    return model.eval(), bare


def masked_batch(mask_id, seed=0):
    """ids [6,L] with [MASK] = mask_id at about half the places (one row all masked); classes incl. the null C."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (6, L), generator=g)
    ids[torch.rand(6, L, generator=g) < 0.5] = mask_id
    ids[0] = mask_id
    return ids, torch.tensor([0, 1, 2, C, C, 3])


def per_token_reference(model, ids, class_ids):
    """Logits [B,L,K] with every fusion conv applied to every token's features (each positive graph separately,
    masked places zeroed by multiplication), the oracle of the table forward for any host."""
    spec, layer = model.knowledge_spec, model.graph_layer
    reps = model.node_representations()
    keep = (ids != spec.mask_token_id)[..., None].float()  # [B,L,1]
    safe = torch.where(ids == spec.mask_token_id, torch.zeros_like(ids), ids)
    prior = model.class_prior(class_ids) if model.graph_cfg.use_incompat else None

    def inject(j, h):
        p = layer.num_points - 1 - j
        term = torch.zeros_like(h[:, -spec.seq_len:])
        for table in reps.values():
            term = term + conv1x1(layer.zero_convs[p], table[safe]) * keep
        if prior is not None:
            term = term - conv1x1(layer.zero_convs_pos[p], prior)
        return torch.cat([h[:, :-spec.seq_len], h[:, -spec.seq_len:] + term], dim=1)

    return model.run_with_injection(ids, class_ids, inject)


# ----------------------------------------------------------------------------- KA on MaskGIT


def test_ka_maskgit_with_zero_fusion_equals_maskgit_exactly():
    model, bare = tiny_ka_maskgit()
    ids, cls = masked_batch(bare.mask_token_id)
    assert bare.mask_token_id == K + C
    with torch.no_grad():
        assert torch.equal(model(ids, cls), bare(ids, cls))
    # training mode, dropout on: the same draws in the same order give the same logits
    model, bare = tiny_ka_maskgit(dropout=0.1)
    model.train(), bare.train()
    outs = []
    for m in (model, bare):
        torch.manual_seed(7)
        outs.append(m(ids, cls))
    assert torch.equal(*outs)
    randomise_fusion(model)
    torch.manual_seed(7)
    assert not torch.equal(model(ids, cls), outs[1])


def test_ka_maskgit_keeps_maskgit_names_and_adds_one_conv_pair_per_layer(tmp_path):
    model, bare = tiny_ka_maskgit(depth=3)
    keys, bare_keys = list(model.state_dict()), list(bare.state_dict())
    assert keys[: len(bare_keys)] == bare_keys  # MaskGIT's names, in MaskGIT's order, then the graph modules
    extra = keys[len(bare_keys):]
    assert all(k.startswith("graph_layer.") for k in extra)
    for name in ("zero_convs", "zero_convs_pos"):
        assert sorted({k.split(".")[2] for k in extra if k.startswith(f"graph_layer.{name}.")}) == ["0", "1", "2"]
    randomise_fusion(model)
    torch.save(model.state_dict(), tmp_path / "ka.pth")
    other, _ = tiny_ka_maskgit(seed=3)
    load_strict(other, load_state_dict_file(tmp_path / "ka.pth"))
    ids, cls = masked_batch(bare.mask_token_id)
    with torch.no_grad():
        assert torch.equal(model(ids, cls), other(ids, cls))
    with torch.device("meta"):
        full = KAMaskGIT()
    added = sum(v.numel() for k, v in full.state_dict().items() if k.startswith("graph_layer."))
    assert added == 32_482_560 and full.graph_layer.num_points == 24


@pytest.mark.parametrize("flags", [dict(), dict(use_co=False), dict(use_incompat=False)])
def test_ka_maskgit_table_forward_and_cache_equal_the_per_token_reference(flags):
    model, bare = tiny_ka_maskgit(GraphConfig(**flags))
    randomise_fusion(model)
    ids, cls = masked_batch(bare.mask_token_id, seed=1)
    with torch.no_grad():
        reference = per_token_reference(model, ids, cls)
        torch.testing.assert_close(model(ids, cls), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(FusionCache(model)(ids, cls), reference, atol=1e-5, rtol=0)
        assert (model(ids, cls) - bare(ids, cls)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the documented interface


class ToyBlock(nn.Module):
    """Pre-norm attention + MLP block of the toy transformer."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h):  # [B,n,dim]
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class ToyTransformer(nn.Module):
    """A masked token transformer of its own design: class token first, pre-norm blocks, a linear head; its [MASK]
    id is neither K nor K + C (the vocabulary has spare ids)."""

    def __init__(self, K=K, L=L, C=C, dim=32, depth=3):
        super().__init__()
        self.K, self.L, self.C, self.dim = K, L, C, dim
        self.mask_id = K + 5
        self.tok_emb = nn.Embedding(K + 6, dim)
        self.cls_emb = nn.Embedding(C + 1, dim)
        self.pos = nn.Parameter(torch.randn(1 + L, dim) * 0.1)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.mlm_layer = nn.Linear(dim, K)

    def embed(self, ids, class_ids):  # -> [B,1+L,dim]
        return torch.cat([self.cls_emb(class_ids)[:, None], self.tok_emb(ids)], dim=1) + self.pos

    def head(self, h):  # [B,1+L,dim] -> [B,L,K]
        return self.mlm_layer(h[:, 1:])

    def forward(self, ids, class_ids):
        h = self.embed(ids, class_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def documented_example() -> str:
    """The code block of docs/reference.md's section on adding the graphs to your own masked generator."""
    doc = (REPO / "docs" / "reference.md").read_text()
    section = doc.split("## Adding the knowledge graphs to your own masked generator", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def documented_host():
    """MyKA of the documented example, defined over ToyTransformer."""
    namespace = {"MyTransformer": ToyTransformer}
    exec(compile(documented_example(), "docs/reference.md", "exec"), namespace)
    return namespace["MyKA"]


def test_a_toy_transformer_gets_ka_through_the_documented_interface():
    MyKA = documented_host()
    torch.manual_seed(0)
    toy = ToyTransformer().eval()
    model = MyKA(GraphConfig(), tiny_graphs()).eval()
    missing = load_strict(model, toy.state_dict(), allow_missing=("graph_layer.",))
    assert missing and all(k.startswith("graph_layer.") for k in missing)
    ids, cls = masked_batch(toy.mask_id, seed=2)
    with torch.no_grad():
        assert torch.equal(model(ids, cls), toy(ids, cls))  # zero fusion: the toy itself, bit for bit
        assert torch.equal(FusionCache(model)(ids, cls), toy(ids, cls))
    randomise_fusion(model)
    with torch.no_grad():
        reference = per_token_reference(model, ids, cls)
        assert (reference - toy(ids, cls)).abs().max() > 1e-3
        torch.testing.assert_close(model(ids, cls), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(FusionCache(model)(ids, cls), reference, atol=1e-5, rtol=0)
    model.train()
    model(ids, cls).sum().backward()  # trainable through the interface
    assert model.graph_layer.zero_convs[0].weight.grad.abs().sum() > 0


def test_a_host_without_the_interface_cannot_be_built():
    class NoRun(KnowledgeHost, ToyTransformer):
        def node_features(self):
            return self.tok_emb.weight[: self.K]

    with pytest.raises(TypeError, match="run_with_injection"):
        NoRun()


# ----------------------------------------------------------------------------- factory and scripts


def test_the_factory_builds_each_backbone_with_and_without_graphs():
    maskgit_cfg, autonat_cfg = load_config_file(TINY), load_config_file("configs/tiny.py")
    assert type(build_model(maskgit_cfg, "maskgit")) is MaskGIT
    model = build_model(maskgit_cfg, "ka_maskgit", tiny_graphs())
    assert type(model) is KAMaskGIT and len(model.graph_layer.zero_convs) == maskgit_cfg.model.depth == 3
    assert isinstance(for_sampling(model.eval()), FusionCache)
    with pytest.raises(ValueError, match="config.backbone='maskgit'"):
        build_model(maskgit_cfg, "ka_mig", tiny_graphs())
    with pytest.raises(ValueError, match="config.backbone='autonat'"):
        build_model(autonat_cfg, "ka_maskgit", tiny_graphs())


def test_each_config_names_its_default_model():
    expected = {"configs/ka_mig_l.py": "ka_mig", "configs/autonat_l.py": "autonat", "configs/maskgit.py": "maskgit",
                "configs/ka_maskgit.py": "ka_maskgit", TINY: "ka_maskgit"}
    assert {path: default_kind(load_config_file(path)) for path in expected} == expected


def save_tiny_graphs(folder):
    """The graphs of tests.helpers.tiny_graphs as a graph folder (configs/tiny.py sizes)."""
    from libs.graphs.files import graph_paths, save_edge_graph, save_incompatibility
    graphs, paths = tiny_graphs(), graph_paths(folder)
    save_edge_graph(paths["co"], *graphs["co"], meta={"codebook_size": K})
    save_edge_graph(paths["sim"], *graphs["sim"], meta={"codebook_size": K})
    save_incompatibility(paths["incompat"], graphs["incompat"].numpy(),
                         meta={"codebook_size": K, "grid": 4, "num_classes": C})
    return folder


def test_tiny_ka_maskgit_trains_with_train_graph_and_samples_with_generate_img(tmp_path):
    import generate_img
    import generate_npz
    import train_graph
    config = load_config_file(TINY)
    backbone = build_model(config, "maskgit")
    torch.save(backbone.state_dict(), tmp_path / "maskgit.pth")
    torch.save({"state_dict": tiny_vqgan().state_dict()}, tmp_path / "vq.ckpt")
    data = write_training_token_dir(tmp_path / "tokens")
    shared = ["--config", TINY, f"--config.graph.dir={save_tiny_graphs(tmp_path / 'graphs')}",
              f"--config.tokenizer.checkpoint={tmp_path / 'vq.ckpt'}"]
    assert train_graph.main([*shared, "--config.train.mode=ka_mig", f"--config.data.path={data}",
                             f"--config.train.init_checkpoint={tmp_path / 'maskgit.pth'}",
                             f"--config.output_dir={tmp_path / 'runs'}", "--config.train.n_steps=2",
                             "--config.train.batch_size=8", "--config.train.log_interval=1"]) == 0
    exported = tmp_path / "runs" / "tiny_ka_maskgit" / "model_ema.safetensors"
    state = load_state_dict_file(exported)
    load_strict(KAMaskGIT(backbone.cfg, GraphConfig(), tiny_graphs()), state)  # the export loads strictly
    for name, value in backbone.state_dict().items():  # the backbone stayed frozen, the head trained
        assert torch.equal(state[name], value) != name.startswith("mlm_layer."), name
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("graph_layer.zero_convs."))

    run_dir = generate_img.main([*shared, "--checkpoint", str(exported), "--classes", "1", "2", "--per-class", "2",
                                 "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert run_dir.name.startswith("ka_maskgit_seed0_")
    assert len(list(run_dir.glob("*_class*.png"))) == 4 and (run_dir / "grid.png").is_file()
    fingerprint = json.loads((run_dir / "fingerprint.json").read_text())["fingerprint"]
    assert fingerprint["model"] == "ka_maskgit" and fingerprint["graphs_sha256"]
    assert fingerprint["schedule"]["name"] == "maskgit" and fingerprint["schedule"]["steps"] == 4
    for kind, checkpoint in (("ka_maskgit", exported), ("maskgit", tmp_path / "maskgit.pth")):
        out = tmp_path / f"npz_{kind}"
        generate_npz.main([*shared, "--model", kind, "--checkpoint", str(checkpoint), "--num-samples", "3",
                           "--batch-size", "2", "--no-fid", "--out", str(out), "--device", "cpu"])
        with np.load(out / "samples.npz") as npz:
            assert npz["arr_0"].shape == (3, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
        stored = json.loads((out / "fingerprint.json").read_text())["fingerprint"]
        assert stored["model"] == kind and bool(stored["graphs_sha256"]) == (kind == "ka_maskgit")
    with pytest.raises(BadInput, match="--model: model 'ka_mig' is not built on config.backbone='maskgit'"):
        generate_img.main([*shared, "--model", "ka_mig", "--checkpoint", str(exported), "--classes", "1",
                           "--out", str(tmp_path / "refused"), "--device", "cpu"])
    assert not (tmp_path / "refused").exists()


def test_tiny_ka_maskgit_docstring_says_what_it_trains_and_its_ka_command_works(tmp_path):
    """configs/tiny_ka_maskgit.py as-is pretrains a bare MaskGIT (configs/tiny.py's mode) and samples KA-MaskGIT;
    the command of its docstring (placeholders filled) trains the graph modules on a tiny MaskGIT's export."""
    import importlib

    import train_graph
    from libs.checkpoint import EXPORT_NAME, save_weights
    from libs.training.trainer import mode_kind
    config = load_config_file(TINY)
    doc = importlib.import_module("configs.tiny_ka_maskgit").__doc__
    assert config.train.mode == "pretrain" and "`train.mode` `pretrain`" in " ".join(doc.split())
    assert mode_kind(config) == "maskgit" and default_kind(config) == "ka_maskgit"
    backbone = build_model(load_config_file("configs/tiny_maskgit.py"), "maskgit")
    save_weights(backbone.state_dict(), tmp_path / "tiny_maskgit" / EXPORT_NAME)
    filled = {"<a configs/tiny_maskgit.py run>": tmp_path / "tiny_maskgit",
              "<graph_construction.build_graphs output>": save_tiny_graphs(tmp_path / "graphs"),
              "<token dataset>": write_training_token_dir(tmp_path / "tokens")}
    command = doc[doc.index("python train_graph.py"):].replace("\\\n", " ")
    for placeholder, value in filled.items():
        command = command.replace(placeholder, str(value))
    argv = command.split()[2:]
    assert "<" not in command and argv[:3] == ["--config", TINY, "--config.train.mode=ka_mig"]
    assert train_graph.main([*argv, f"--config.output_dir={tmp_path / 'runs'}", "--config.train.n_steps=1",
                             "--config.train.batch_size=4"]) == 0
    state = load_state_dict_file(tmp_path / "runs" / "tiny_ka_maskgit" / EXPORT_NAME)
    assert any(k.startswith("graph_layer.") for k in state)  # a KA-MaskGIT, on the given backbone
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items() if not k.startswith("mlm_layer."))
