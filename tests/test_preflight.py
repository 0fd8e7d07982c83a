"""Output locations and --device are checked before any work: a blocked output (a file where a folder goes, a
read-only folder, a full disk) or a device this machine lacks is one line `error: ...`, exit status 2."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import libs.cli
from libs.cli import check_writable
from libs.data.tokens import write_token_dataset
from libs.devices import check_device
from libs.errors import BadInput
from tests.helpers import REPO, tiny_backbone, tiny_vqgan

TINY = ["--config", "configs/tiny.py", "--config.model.depth=4"]  # the depth of tests.helpers.tiny_backbone


def write_inputs(root: Path):
    """Tokenizer, backbone, tokens, reference statistics, one image, and the blocked output locations."""
    torch.save({"state_dict": tiny_vqgan().state_dict()}, root / "vq.ckpt")
    torch.save(tiny_backbone().state_dict(), root / "backbone.pth")
    rng = np.random.default_rng(0)
    write_token_dataset(root / "tok", rng.integers(0, 32, (16, 16)), rng.integers(0, 4, 16),
                        dict(codebook_size=32, grid=4, num_classes=4))
    np.savez(root / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (root / "data" / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "data" / "train" / "a" / "x.png")
    (root / "a_file").write_text("")  # a file where an output folder should be
    (root / "runs" / "r").mkdir(parents=True)
    (root / "runs" / "r" / "checkpoints").write_text("")  # a run folder whose checkpoints/ is a file
    (root / "tok_blocked").mkdir()
    (root / "tok_blocked" / "_partial").write_text("")  # a token folder whose _partial/ is a file


def train_args(root: Path) -> list:
    return [*TINY, f"--config.data.path={root / 'tok'}", "--config.train.n_steps=4", "--config.train.save_interval=2"]


def extract_args(root: Path) -> list:
    return [*TINY, f"--config.tokenizer.checkpoint={root / 'vq.ckpt'}", "--path", str(root / "data"),
            "--split", "train", "--workers", "0"]


def sample_args(root: Path) -> list:
    return [*TINY, f"--config.tokenizer.checkpoint={root / 'vq.ckpt'}", "--model", "autonat",
            "--checkpoint", str(root / "backbone.pth")]


def cases(root: Path) -> dict:
    """{case name: (argv after the python executable, what the one line must say)}: run as commands."""
    return {
        "train_graph checkpoints/ is a file": (
            ["train_graph.py", *train_args(root), f"--config.output_dir={root / 'runs'}", "--config.run_name=r"],
            "runs/r/checkpoints exists and is not a folder"),
        "train_graph output_dir is a file": (
            ["train_graph.py", *train_args(root), f"--config.output_dir={root / 'a_file'}"],
            "a_file is a file, not a folder"),
        "extract --out inside a file": (
            ["extract_imagenet_feature.py", *extract_args(root), "--device", "cpu", "--out",
             str(root / "a_file" / "tok")], "a_file is a file, not a folder"),
        "generate_img --device gpu": (
            ["generate_img.py", *sample_args(root), "--classes", "1", "--per-class", "1", "--out", str(root / "img"),
             "--device", "gpu"], "--device 'gpu' is not a device name (use cpu, cuda, cuda:N or mps)"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case: (returncode, stderr, root)} of every case, run concurrently."""
    root = tmp_path_factory.mktemp("preflight")
    write_inputs(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases(root).items()}
    out = {}
    for name, p in procs.items():
        stderr = p.communicate(timeout=600)[1]
        out[name] = (p.returncode, stderr, root)
    return out


@pytest.mark.parametrize("case", list(cases(Path("/x"))))
def test_blocked_output_or_device_is_one_line_exit_2(results, case):
    code, stderr, root = results[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and cases(root)[case][1] in lines[0], stderr[-3000:]


def test_nothing_was_done_before_the_check(results):
    """No training step, no tokenizer run, no sample happened before the verdict."""
    root = results["train_graph checkpoints/ is a file"][2]
    assert sorted(p.name for p in (root / "runs" / "r").iterdir()) == ["checkpoints"]  # no log.csv, config.json
    assert (root / "runs" / "r" / "checkpoints").is_file()
    assert not (root / "img").exists() and (root / "a_file").is_file()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight_in_process")
    write_inputs(root)
    return root


def test_extract_checks_its_folders_and_device_first(inputs, capsys):
    import extract_imagenet_feature
    for extra, expected in ((["--device", "cpu", "--out", str(inputs / "tok_blocked")],
                             "tok_blocked/_partial exists and is not a folder"),
                            (["--device", "cuda:99", "--out", str(inputs / "tok_dev")], "--device cuda:99")):
        assert extract_imagenet_feature.main(extract_args(inputs) + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (inputs / "tok_blocked").iterdir()) == ["_partial"]
    assert not (inputs / "tok_dev").exists()


@pytest.mark.parametrize("script, extra, expected", [
    ("generate_npz", ["--num-samples", "2", "--no-fid", "--device", "cuda:99"], "--device cuda:99"),
    ("strategy_search", ["--num-samples", "2", "--ref-stats", "REF", "--device", "mps"],
     "--device mps: the MPS backend is not available"),
])
def test_sampling_scripts_check_the_device_first(inputs, monkeypatch, script, extra, expected):
    if script == "generate_npz":
        import generate_npz as module
    else:
        from libs.sampling import strategy_search as module
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = inputs / f"{script}_out"
    args = sample_args(inputs) + [a.replace("REF", str(inputs / "ref.npz")) for a in extra] + ["--out", str(out)]
    with pytest.raises(BadInput, match=expected):
        module.main(args)
    assert not out.exists()


def test_fid_stats_checks_the_device_first(inputs):
    from libs.evaluation import fid_stats
    with pytest.raises(BadInput, match="--device 'gpu' is not a device name"):
        fid_stats.main(["--images", str(inputs / "data" / "train" / "a"), "--out", str(inputs / "ref_out.npz"),
                        "--device", "gpu"])
    assert not (inputs / "ref_out.npz").exists()


def test_check_writable_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(BadInput, match=f"cannot create the folder {tmp_path}/f/a/b \\({tmp_path}/f is a file"):
        check_writable(folders=[tmp_path / "f" / "a" / "b"])
    with pytest.raises(BadInput, match="it is a folder"):
        check_writable(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_check_writable_reports_a_full_disk_or_read_only_folder(tmp_path, monkeypatch, code):
    """The probe file cannot be written (full disk, read-only file system, no permission: simulated, as the
    tests may run as root, whom permissions do not stop)."""
    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(libs.cli, "open", refuse, raising=False)
    with pytest.raises(BadInput, match=f"the folder {tmp_path}/out is not writable \\({os.strerror(code)}\\)"):
        check_writable(tmp_path / "out" / "samples.npz")
    assert list(tmp_path.iterdir()) == []  # the folder made for the probe is gone again


@pytest.mark.parametrize("name, gpus, expected", [
    (None, 0, "cpu"), ("cpu", 2, "cpu"), ("cuda", 2, "cuda"), ("cuda:1", 2, "cuda:1"),
    ("gpu", 2, "--device 'gpu' is not a device name (use cpu, cuda, cuda:N or mps)"),
    ("cuda", 0, "--device cuda: no usable CUDA GPU on this machine"),
    ("cuda:2", 2, "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA device(s), cuda:0"),
    ("meta", 0, "--device meta: device type 'meta' is not supported here"),
    ("cpu:1", 0, "--device cpu:1: there is one CPU device"),
    ("", 0, "--device '' is not a device name"),
])
def test_check_device(monkeypatch, name, gpus, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if expected.startswith("--device"):
        with pytest.raises(BadInput) as e:
            check_device(name)
        assert str(e.value).startswith(expected)
    else:
        assert check_device(name) == torch.device(expected)


def test_check_device_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(BadInput, match="--device mps: the MPS backend is not available"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == torch.device("mps")
