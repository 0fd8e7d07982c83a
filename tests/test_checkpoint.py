"""Checkpoints from other tools: wrapper prefixes are stripped with a warning; mismatch messages show
unexpected keys beside missing ones and name the likely cause."""
import pytest
import torch

from libs.checkpoint import load_state_dict_file, load_strict
from libs.errors import BadInput
from tests.helpers import tiny_backbone, tiny_ka_mig


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped_with_a_warning(tmp_path, prefix):
    source = tiny_backbone(seed=0)
    path = tmp_path / "wrapped.pth"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    with pytest.warns(UserWarning, match="stripped") as warned:
        state = load_state_dict_file(path)
    assert all(p in str(warned[0].message) for p in prefix.rstrip(".").split("."))
    target = tiny_backbone(seed=1)
    load_strict(target, state)
    assert same_weights(source, target)


def test_load_strict_strips_a_prefixed_dict_too(tmp_path):
    source = tiny_backbone(seed=0)
    target = tiny_backbone(seed=1)
    with pytest.warns(UserWarning, match="module"):
        load_strict(target, {"module." + k: v for k, v in source.state_dict().items()}, source="ddp")
    assert same_weights(source, target)


def test_other_prefix_is_named_as_the_likely_cause(tmp_path):
    state = {"model." + k: v for k, v in tiny_backbone().state_dict().items()}
    with pytest.raises(BadInput) as err:
        load_strict(tiny_backbone(), state, source="lightning.ckpt")
    msg = str(err.value)
    assert "every checkpoint key starts with 'model.'" in msg
    n = len(state)
    assert f"{n} missing, {n} unexpected" in msg
    assert "missing: " in msg and "unexpected: model." in msg and f"(+{n - 5} more)" in msg


def test_ka_mig_checkpoint_into_the_backbone_names_the_model_flag():
    ka_mig, _ = tiny_ka_mig()
    with pytest.raises(BadInput) as err:
        load_strict(tiny_backbone(), ka_mig.state_dict(), source="graph_nnet_ema.pth")
    msg = str(err.value)
    assert "graph_layer" in msg and "use --model ka_mig" in msg and "unexpected: graph_layer." in msg


def test_mismatch_lists_missing_and_unexpected_side_by_side():
    state = dict(tiny_backbone().state_dict())
    first = next(iter(state))
    state["renamed.weight"] = state.pop(first)
    with pytest.raises(BadInput) as err:
        load_strict(tiny_backbone(), state, source="edited.pth")
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 0 of another shape" in msg
    assert f"missing: {first}" in msg and "unexpected: renamed.weight" in msg


def test_training_checkpoint_is_named_as_such(tmp_path):
    torch.save({"model": {"a": torch.ones(1)}, "ema": {}, "optimizer": {}, "step": 3}, tmp_path / "step.pt")
    with pytest.raises(BadInput, match="model_ema.safetensors"):
        load_state_dict_file(tmp_path / "step.pt")
