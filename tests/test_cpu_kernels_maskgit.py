"""CPU kernels (libs/models/cpu_kernels.py) on MaskGIT and KA-MaskGIT: oneDNN linears with the tanh GELU fused,
logits of the plain model, same state_dict, training untouched."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from libs.checkpoint import load_strict, save_weights
from libs.config import load_config_file
from libs.models import cpu_kernels, maskgit
from libs.models.factory import load_model
from libs.models.fusion_cache import FusionCache
from tests.helpers import C, K, L, tiny_graphs, token_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"maskgit": "configs/tiny_maskgit.py", "ka_maskgit": "configs/tiny_ka_maskgit.py"}


def randomised(kind: str):
    """A tiny MaskGIT / KA-MaskGIT (configs/tiny_maskgit.py sizes) in eval mode with every parameter moved by
    seeded N(0, 0.05) noise (no zero bias, no unit LayerNorm, non-zero fusion)."""
    model = token_model(kind)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def backbone_linears(model) -> int:
    """nn.Linear layers outside the graph modules (the ones the switch should swap)."""
    return sum(isinstance(m, torch.nn.Linear) for name, m in model.named_modules()
               if not name.startswith("graph_layer"))


def batch(mask_id, seed=0):
    """ids [3,L] with about half [MASK], class ids [3] incl. the null class C."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (3, L), generator=g)
    ids[torch.rand(3, L, generator=g) < 0.5] = mask_id
    return ids, torch.tensor([0, 2, C])


@pytest.fixture
def onednn_calls(monkeypatch):
    """List of the post-op names ('gelu' / 'none') and algorithms of every oneDNN call made during the test."""
    cpu_kernels.tanh_gelu_fusable()  # its one-off probe call (cached) is not one the test should count
    calls, onednn = [], cpu_kernels.ONEDNN_LINEAR
    monkeypatch.setattr(cpu_kernels, "ONEDNN_LINEAR", lambda *a: calls.append((a[3], a[5])) or onednn(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_fuses_the_tanh_gelu(bias):
    assert cpu_kernels.ONEDNN_LINEAR is not None and cpu_kernels.tanh_gelu_fusable()  # true for the pinned torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 3, 64, generator=g).transpose(0, 1)  # [3,17,64], not contiguous
    plain = torch.nn.Linear(64, 96, bias=bias)
    with torch.no_grad():
        plain.weight.mul_(8)  # pre-activations of a few units, where tanh and exact GELU differ by ~1e-3
        want = F.gelu(plain(x), approximate="tanh")
        got = cpu_kernels.OneDNNLinear(plain, gelu=True, approximate="tanh")(x)
        exact = F.gelu(plain(x))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (exact - want).abs().max() > 1e-4  # the oracle tells the two GELUs apart


@pytest.mark.parametrize("kind", ["maskgit", "ka_maskgit"])
def test_onednn_switch_keeps_maskgit_logits_and_names(kind, onednn_calls):
    plain = randomised(kind)
    fast = cpu_kernels.apply_cpu_kernels(copy.deepcopy(plain), "onednn")
    n = backbone_linears(plain)
    depth = plain.cfg.depth
    assert n == 4 * depth + 2 * depth + 1  # q/k/v/out, two MLP denses per layer, the head's dense
    assert cpu_kernels.onednn_layer_count(fast) == n > 0
    assert list(fast.state_dict()) == list(plain.state_dict())  # same checkpoint names, in order
    load_strict(plain, fast.state_dict())  # and each loads the other's weights strictly
    load_strict(fast, plain.state_dict())
    mlp = fast.layers[0].mlp
    assert isinstance(mlp, maskgit.Mlp) and mlp.intermediate_output.approximate == "tanh"
    if kind == "ka_maskgit":  # the GCNs and graph modules keep nn.Linear
        assert type(fast.graph_layer.co_graph_layer.conv1.lin) is torch.nn.Linear
    ids, cls = batch(plain.mask_token_id)
    with torch.inference_mode():
        got, want = fast(ids, cls), plain(ids, cls)
    assert len(onednn_calls) == n  # every backbone linear went through oneDNN once
    assert onednn_calls.count(("gelu", "tanh")) == depth + 1  # MLPs + head dense, GELU fused
    assert onednn_calls.count(("none", "")) == n - depth - 1
    assert got.shape == (3, L, K) and torch.allclose(got, want, atol=1e-5, rtol=0)
    if kind == "ka_maskgit":  # what the sampler calls
        with torch.no_grad():
            torch.testing.assert_close(FusionCache(fast)(ids, cls), FusionCache(plain)(ids, cls), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["maskgit", "ka_maskgit"])
def test_onednn_switch_leaves_maskgit_training_alone(kind, onednn_calls):
    plain = randomised(kind).train()
    fast = cpu_kernels.apply_cpu_kernels(copy.deepcopy(plain), "onednn").train()
    assert cpu_kernels.onednn_layer_count(fast) == backbone_linears(plain)  # swapped, so the check means something
    ids, cls = batch(plain.mask_token_id, seed=1)
    got, want = fast(ids, cls), plain(ids, cls)  # grad enabled: F.linear + F.gelu, the plain model's ops
    assert torch.equal(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.eval()(ids, cls).dtype == torch.bfloat16  # autocast keeps its own casting rules
    assert onednn_calls == []


def test_onednn_switch_without_tanh_fusion_swaps_only_the_linears(monkeypatch, onednn_calls):
    monkeypatch.setattr(cpu_kernels, "tanh_gelu_fusable", lambda: False)
    plain = randomised("maskgit")
    fast = cpu_kernels.apply_cpu_kernels(copy.deepcopy(plain), "onednn")
    n = backbone_linears(plain)
    assert cpu_kernels.onednn_layer_count(fast) == n
    assert type(fast.layers[0].mlp) is maskgit.Mlp and type(fast.mlm_layer) is maskgit.MlmLayer
    ids, cls = batch(plain.mask_token_id, seed=2)
    with torch.no_grad():
        got, want = fast(ids, cls), plain(ids, cls)
    assert onednn_calls == [("none", "")] * n  # the GELUs stay F.gelu in the modules' forwards
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["maskgit", "ka_maskgit"])
def test_load_model_swaps_maskgit_linears(kind, tmp_path):
    config = load_config_file(REPO / CONFIGS[kind])
    plain = randomised(kind)
    path = save_weights(plain.state_dict(), tmp_path / "model.safetensors")
    graphs = tiny_graphs() if kind == "ka_maskgit" else None
    fast = load_model(config, kind, checkpoint=path, graphs=graphs, cpu_kernels="onednn")  # strict load
    default = load_model(config, kind, checkpoint=path, graphs=graphs, cpu_kernels="default")
    assert cpu_kernels.onednn_layer_count(fast) == backbone_linears(plain) > 0
    assert cpu_kernels.onednn_layer_count(default) == 0
    ids, cls = batch(plain.mask_token_id, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, cls), plain(ids, cls), atol=1e-5, rtol=0)


def test_onednn_switch_refuses_a_model_it_cannot_change():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(approximate="tanh"))
    with pytest.raises(ValueError, match="Sequential has no AutoNAT or MaskGIT"):
        cpu_kernels.apply_cpu_kernels(model, "onednn")
    assert cpu_kernels.onednn_layer_count(model) == 0
