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


def test_missing_checkpoint_message_names_its_folder_and_only_what_it_knows():
    from libs.checkpoint import missing_asset_message, require_file
    from libs.errors import MissingInput, one_line
    with pytest.raises(MissingInput) as err:
        require_file("/nonexist.pth")
    assert one_line(err.value) == (
        "checkpoint not found: /nonexist.pth; put 'nonexist.pth' in the folder '/' (or pass its path: --checkpoint "
        "for the token model, --config.tokenizer.checkpoint=<path> for the tokenizer, "
        "--config.train.init_checkpoint=<path> for training). How to get it: README.md, section 'Checkpoints "
        "(assets/)'.")
    assert "in the folder './'" in missing_asset_message("w.pth")
    assert "this is the MAGE VQGAN tokenizer" in missing_asset_message("assets/vqgan_jax_strongaug.ckpt")


def test_missing_maskgit_weights_name_the_convert_command(tmp_path, capsys):
    """The files tools.convert_maskgit writes (configs/maskgit.py, DEFAULT_CHECKPOINTS) name that command."""
    import generate_img
    from libs.checkpoint import CONVERT_MASKGIT, missing_asset_message
    from libs.cli import run_main
    from libs.config import load_config_file
    from libs.models.factory import DEFAULT_CHECKPOINTS
    config = load_config_file("configs/maskgit.py")
    for path in (config.tokenizer.checkpoint, config.train.init_checkpoint, DEFAULT_CHECKPOINTS["maskgit"]):
        assert f"How to get it: `{CONVERT_MASKGIT}`" in missing_asset_message(path), path
    assert CONVERT_MASKGIT == ("python -m tools.convert_maskgit --tokenizer <tokenizer_imagenet256_checkpoint> "
                               "--transformer <maskgit_imagenet256_checkpoint> --out assets/")
    tokenizer = tmp_path / "assets" / "tokenizer_imagenet256.safetensors"
    with pytest.raises(SystemExit) as exit_status:
        run_main(generate_img.main, ["--config", "configs/maskgit.py", f"--config.tokenizer.checkpoint={tokenizer}",
                                     "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint not found: {tokenizer}; this is the MaskGIT")
    assert lines[0].endswith(f"How to get it: `{CONVERT_MASKGIT}` (README.md, section 'Checkpoints (assets/)').")


def test_missing_ka_maskgit_weights_say_none_were_released():
    from libs.checkpoint import TRAIN_KA_MASKGIT, missing_asset_message
    from libs.models.factory import DEFAULT_CHECKPOINTS
    message = missing_asset_message(DEFAULT_CHECKPOINTS["ka_maskgit"])
    assert "none released" in message and f"How to get it: `{TRAIN_KA_MASKGIT}`" in message
    assert TRAIN_KA_MASKGIT.startswith("train_graph.py --config configs/ka_maskgit.py")


@pytest.mark.parametrize("config_file, saved, loaded", [("configs/tiny_ka_maskgit.py", "ka_maskgit", "maskgit"),
                                                        ("configs/tiny_ka_maskgit.py", "maskgit", "ka_maskgit"),
                                                        ("configs/tiny.py", "ka_mig", "autonat"),
                                                        ("configs/tiny.py", "autonat", "ka_mig")])
def test_model_mismatch_hint_names_the_kind_of_the_configs_backbone(tmp_path, config_file, saved, loaded):
    """A checkpoint with (or without) the graphs loaded as the other kind: the hint names the --model value the
    config's backbone accepts (factory.BACKBONE_KINDS), never the other backbone's."""
    from libs.checkpoint import save_weights
    from libs.config import load_config_file
    from libs.models.factory import build_model, check_model_kind, load_model
    from tests.helpers import tiny_graphs
    config = load_config_file(config_file)
    save_weights(build_model(config, saved, graphs=tiny_graphs()).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(BadInput) as err:
        load_model(config, loaded, checkpoint=tmp_path / "w.safetensors", graphs=tiny_graphs())
    assert f"use --model {saved} " in str(err.value)
    check_model_kind(config, saved)  # the named kind is one this config builds
    other = {"ka_mig", "autonat", "ka_maskgit", "maskgit"} - {saved, loaded}
    assert not any(f"--model {kind}" in str(err.value) for kind in other)
