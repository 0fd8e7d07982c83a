"""Backbone: output shape, detached head embedding, SDPA attention, strict loading, tokenizer check."""
import copy

import pytest
import torch

from libs.models import cpu_kernels
from libs.models.autonat import AutoNATConfig
from libs.models.factory import check_tokenizer_matches
from libs.checkpoint import load_state_dict_file, load_strict
from tests.helpers import tiny_backbone


def test_output_shape_and_class_id_forms():
    model = tiny_backbone()
    ids = torch.randint(0, 33, (3, 16))
    cls = torch.tensor([0, 3, 4])
    out = model(ids, cls)
    assert out.shape == (3, 16, 32)
    assert torch.equal(out, model(ids, cls[:, None]))


def test_head_gradient_does_not_reach_word_embedding():
    model = tiny_backbone()
    ids = torch.randint(0, 8, (2, 16))  # rows 8.. of the embedding are never inputs
    model(ids, torch.tensor([1, 2])).square().sum().backward()
    grad = model.token_emb.word_embeddings.weight.grad
    assert grad[:8].abs().sum() > 0            # the input path does train the embedding
    assert torch.all(grad[8:] == 0)            # the head's use of it is detached


def explicit_attention(attn, x):
    q, k, v = attn.split_heads(x)
    w = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    B, n, C = x.shape
    return attn.proj((w @ v).transpose(1, 2).reshape(B, n, C))


def test_sdpa_attention_equals_explicit_softmax():
    model = tiny_backbone()
    x = torch.randn(3, 17, 32)
    for block in model.blocks:
        torch.testing.assert_close(block.attn(x), explicit_attention(block.attn, x), atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_gradients():
    a = tiny_backbone(use_checkpoint=False).train()
    b = tiny_backbone(use_checkpoint=True).train()
    ids, cls = torch.randint(0, 33, (2, 16)), torch.tensor([0, 1])
    a(ids, cls).sum().backward()
    b(ids, cls).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_strict_load_round_trip(tmp_path):
    a, b = tiny_backbone(seed=0), tiny_backbone(seed=1)
    torch.save(a.state_dict(), tmp_path / "nnet_ema.pth")
    load_strict(b, load_state_dict_file(tmp_path / "nnet_ema.pth"))
    ids, cls = torch.randint(0, 33, (2, 16)), torch.tensor([0, 4])
    assert torch.equal(a(ids, cls), b(ids, cls))


def test_wrong_architecture_is_refused_with_names(tmp_path):
    torch.save(tiny_backbone(codebook_size=64).state_dict(), tmp_path / "nnet_ema.pth")
    with pytest.raises(ValueError) as err:
        load_strict(tiny_backbone(), load_state_dict_file(tmp_path / "nnet_ema.pth"), "nnet_ema.pth")
    assert "token_emb.word_embeddings.weight" in str(err.value)


def test_tokenizer_backbone_mismatch_refused():
    cfg = AutoNATConfig(codebook_size=32, seq_len=16)
    check_tokenizer_matches(32, 4, cfg)
    with pytest.raises(ValueError, match="codebook 64"):
        check_tokenizer_matches(64, 4, cfg)
    with pytest.raises(ValueError, match="grid 8x8"):
        check_tokenizer_matches(32, 8, cfg)


# ----------------------------------------------------------------------------- CPU kernels (oneDNN linears)

@pytest.mark.parametrize("bias, gelu", [(True, False), (False, False), (True, True)])
def test_onednn_linear_equals_f_linear(bias, gelu):
    assert cpu_kernels.ONEDNN_LINEAR is not None  # the pinned torch has it; otherwise this test proves nothing
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 3, 64, generator=g).transpose(0, 1)  # [3,17,64], not contiguous
    plain = torch.nn.Linear(64, 96, bias=bias)
    want = plain(x)
    want = torch.nn.functional.gelu(want) if gelu else want
    layer = cpu_kernels.OneDNNLinear(plain, gelu=gelu)
    assert layer.weight is plain.weight  # parameters shared, not copied
    with torch.no_grad():
        assert cpu_kernels.onednn_eligible(x, layer.weight)
        got = layer(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_switch_keeps_logits_and_weights_and_stays_out_of_training(monkeypatch):
    plain = tiny_backbone().eval()
    fast = cpu_kernels.apply_cpu_kernels(copy.deepcopy(plain), "onednn")
    assert cpu_kernels.apply_cpu_kernels(plain, "default") is plain
    assert not any(isinstance(m, cpu_kernels.OneDNNLinear) for m in plain.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())  # same checkpoint names
    ids, cls = torch.randint(0, 33, (3, 16)), torch.tensor([0, 3, 4])
    calls = []
    onednn = cpu_kernels.ONEDNN_LINEAR
    monkeypatch.setattr(cpu_kernels, "ONEDNN_LINEAR", lambda *a: calls.append(a[3]) or onednn(*a))
    with torch.no_grad():
        got, want = fast(ids, cls), plain(ids, cls)
    n_layers = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert len(calls) == n_layers and calls.count("gelu") == len(plain.blocks) + 1  # MLPs + head fc, fused
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    calls.clear()
    fast(ids, cls).sum().backward()  # grad enabled: F.linear, so autograd works as usual
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(ids, cls).dtype == torch.bfloat16  # autocast keeps its own casting rules
    assert calls == []
    with pytest.raises(ValueError, match="cpu kernels"):
        cpu_kernels.apply_cpu_kernels(plain, "mkl")
