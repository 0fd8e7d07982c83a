""".safetensors weights: the writer, loading by content beside torch files, and tools.to_safetensors."""
import json

import pytest
import safetensors.torch
import torch
from ml_collections import ConfigDict

from libs.atomic_io import atomic_save_safetensors, safetensors_bytes
from libs.checkpoint import load_state_dict_file, load_strict, weights_format, weights_metadata
from libs.cli import run_main
from libs.errors import BadInput, MissingInput
from libs.models.factory import load_tokenizer
from tests.helpers import tiny_backbone, tiny_vqgan
from tools.to_safetensors import main as to_safetensors


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_writer_matches_the_safetensors_library_and_is_byte_reproducible():
    state = {"w": torch.randn(3, 4).t(), "b": torch.arange(5), "h": torch.randn(2).bfloat16(),
             "f": torch.randn(2, 2).half(), "m": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    data = safetensors_bytes(state, {"config": "{}", "format": "pt"})
    loaded = safetensors.torch.load(data)
    assert same_state(loaded, state)
    assert safetensors_bytes(dict(reversed(list(state.items()))), {"format": "pt", "config": "{}"}) == data
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0 and json.loads(data[8:8 + header_len])["__metadata__"]["config"] == "{}"
    with pytest.raises(ValueError, match="'x' is not a tensor"):
        safetensors_bytes({"x": 3})


def test_loaders_accept_both_formats_by_content(tmp_path):
    model = tiny_backbone(seed=3)
    state = model.state_dict()
    torch.save(state, tmp_path / "w.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # a pickle, not a zip
    atomic_save_safetensors(state, tmp_path / "w.pth.safe")  # the name does not decide: the first bytes do
    atomic_save_safetensors(state, tmp_path / "w_st.pth")
    assert weights_format(tmp_path / "w.pth") == "torch"
    assert weights_format(tmp_path / "w_st.pth") == "safetensors"
    assert weights_format(tmp_path / "legacy.pth") == "torch"
    for name in ("w.pth", "legacy.pth", "w.pth.safe", "w_st.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert same_state(loaded, state)
        target = tiny_backbone(seed=4)
        load_strict(target, loaded, source=name)
        assert same_state(target.state_dict(), state)


def test_tokenizer_loads_from_safetensors(tmp_path):
    vq = tiny_vqgan(seed=2)
    atomic_save_safetensors(vq.state_dict(), tmp_path / "vq.safetensors")
    cfg = ConfigDict({**vq.config_dict(), "checkpoint": str(tmp_path / "vq.safetensors")})
    assert same_state(load_tokenizer(cfg).state_dict(), vq.state_dict())


def test_strict_checks_and_messages_are_the_same(tmp_path):
    state = {"module." + k: v for k, v in tiny_backbone().state_dict().items()}
    atomic_save_safetensors(state, tmp_path / "ddp.safetensors")
    with pytest.warns(UserWarning, match="stripped"):
        assert not any(k.startswith("module.") for k in load_state_dict_file(tmp_path / "ddp.safetensors"))
    other = {"model." + k: v for k, v in tiny_backbone().state_dict().items()}
    atomic_save_safetensors(other, tmp_path / "other.safetensors")
    with pytest.raises(BadInput, match="every checkpoint key starts with 'model.'"):
        load_strict(tiny_backbone(), load_state_dict_file(tmp_path / "other.safetensors"), source="other")
    good = safetensors_bytes(tiny_backbone().state_dict())
    (tmp_path / "cut.safetensors").write_bytes(good[:len(good) // 2])
    with pytest.raises(BadInput, match="cut.safetensors: not a readable weights file"):
        load_state_dict_file(tmp_path / "cut.safetensors")
    (tmp_path / "text.pth").write_text("hello, not weights")
    with pytest.raises(BadInput, match="text.pth: not a readable weights file"):
        load_state_dict_file(tmp_path / "text.pth")
    with pytest.raises(MissingInput, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "absent.safetensors")


def test_to_safetensors_converts_and_is_byte_reproducible(tmp_path, capsys):
    vq = tiny_vqgan(seed=1)
    config = {"tokenizer": vq.config_dict(), "train": {"steps": 3}}
    torch.save({"state_dict": vq.state_dict(), **config}, tmp_path / "vq.pth")
    assert to_safetensors([str(tmp_path / "vq.pth"), str(tmp_path / "a.safetensors")]) == 0
    assert to_safetensors([str(tmp_path / "vq.pth"), str(tmp_path / "b.safetensors")]) == 0
    assert "config in its metadata" in capsys.readouterr().out
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    assert same_state(safetensors.torch.load_file(tmp_path / "a.safetensors"), vq.state_dict())
    assert same_state(load_state_dict_file(tmp_path / "a.safetensors"), vq.state_dict())
    meta = weights_metadata(tmp_path / "a.safetensors")
    assert meta["format"] == "pt" and json.loads(meta["config"]) == json.loads(json.dumps(config))
    backbone = tiny_backbone(seed=5)  # a bare state dict: no config known
    torch.save(backbone.state_dict(), tmp_path / "nnet_ema.pth")
    to_safetensors([str(tmp_path / "nnet_ema.pth"), str(tmp_path / "nnet_ema.safetensors")])
    assert weights_metadata(tmp_path / "nnet_ema.safetensors") == {"format": "pt"}
    assert same_state(load_state_dict_file(tmp_path / "nnet_ema.safetensors"), backbone.state_dict())


def test_to_safetensors_bad_input_is_one_line(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = {tmp_path / "absent.pth": "input not found",
             tmp_path / "notes.txt": "not a readable weights file",
             tmp_path / "mixed.pth": "not a state dict"}
    for src, message in cases.items():
        with pytest.raises(SystemExit) as exit_status:
            run_main(to_safetensors, [str(src), str(tmp_path / "out.safetensors")])
        assert exit_status.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and str(src) in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def to_safetensors_error(capsys, *argv) -> str:
    """The one line `python -m tools.to_safetensors <argv>` ends with (asserts exit status 2, one line)."""
    with pytest.raises(SystemExit) as exit_status:
        run_main(to_safetensors, [str(a) for a in argv])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_to_safetensors_refuses_its_own_input_as_output(tmp_path, capsys, monkeypatch):
    torch.save(tiny_backbone(seed=2).state_dict(), tmp_path / "w.pth")
    before = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pth").symlink_to(tmp_path / "w.pth")
    (tmp_path / "hard.pth").hardlink_to(tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    for dst in ("w.pth", tmp_path / "w.pth", "sub/../w.pth", tmp_path / "link.pth", tmp_path / "hard.pth"):
        line = to_safetensors_error(capsys, "w.pth", dst)
        assert line == f"error: output {dst} is the input w.pth itself; write the .safetensors file to another path"
    assert (tmp_path / "w.pth").read_bytes() == before  # a torch file still, untouched


def test_to_safetensors_output_folder_and_missing_input_are_one_line(tmp_path, capsys):
    torch.save(tiny_backbone(seed=2).state_dict(), tmp_path / "w.pth")
    (tmp_path / "out").mkdir()
    line = to_safetensors_error(capsys, tmp_path / "w.pth", tmp_path / "out")
    assert line == f"error: cannot write {tmp_path / 'out'}: it is a folder"
    assert list((tmp_path / "out").iterdir()) == []
    assert to_safetensors_error(capsys, "/nonexist.pth", tmp_path / "x.safetensors") == \
        "error: input not found: /nonexist.pth"
    assert to_safetensors_error(capsys, tmp_path / "out", tmp_path / "x.safetensors") == \
        f"error: input {tmp_path / 'out'} is a folder, not a weights file"
    assert not (tmp_path / "x.safetensors").exists()
