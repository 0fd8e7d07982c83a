"""Full-size networks built on the meta device match the published checkpoints' tensor manifests."""
import torch

from libs.models.autonat import AutoNAT
from libs.models.vqgan import VQGAN
from tests.helpers import manifest, read_manifest


def test_vqgan_matches_published_manifest():
    with torch.device("meta"):
        model = VQGAN()
    assert manifest(model) == read_manifest("vqgan_f16_mage.txt")


def test_autonat_l_matches_published_manifest():
    with torch.device("meta"):
        model = AutoNAT()
    assert manifest(model) == read_manifest("autonat_l.txt")
    assert sum(p.numel() for p in model.parameters()) == 193655297
