"""Small builders shared by the tests."""
import torch

from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.vqgan import VQGAN, VQGANConfig

from pathlib import Path

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
