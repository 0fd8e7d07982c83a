"""Inputs a new user can get wrong are refused in one line before anything is written: fid_stats --out that is
its input or a file that is not statistics, a resume below the checkpoint's step, a run_name outside output_dir,
a negative --stop-after-chunks, and reference statistics that are not an .npz."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

import extract_imagenet_feature
from libs.errors import BadInput
from libs.evaluation import fid_stats
from libs.evaluation.fid_stats import load_reference_stats
from libs.training.trainer import Trainer
from tests.helpers import synthetic_tokens, tiny_config


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_fid_stats(capsys, *argv):
    """(exit status, stderr) of python -m libs.evaluation.fid_stats with argv; fails if it gets past the checks."""
    with pytest.raises(SystemExit) as e:
        fid_stats.run_main(fid_stats.main, ["--device", "cpu", "--no-progress", *argv])
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def images_npz(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    return path


def test_fid_stats_refuses_out_that_is_its_input(images_npz, capsys):
    before = digest(images_npz)
    code, err = run_fid_stats(capsys, "--images", str(images_npz), "--out", str(images_npz), "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--out {images_npz} is the --images input itself" in err
    assert digest(images_npz) == before


def test_fid_stats_refuses_out_that_is_its_input_through_a_link(images_npz, tmp_path, capsys):
    link = tmp_path / "link.npz"
    os.link(images_npz, link)  # another name of the same file
    code, err = run_fid_stats(capsys, "--images", str(images_npz), "--out", str(link), "--overwrite")
    assert code == 2 and "is the --images input itself" in err


def test_fid_stats_refuses_to_replace_a_file_that_is_not_statistics(images_npz, tmp_path, capsys):
    ckpt = tmp_path / "nnet_ema.pth"
    ckpt.write_bytes(b"weights that must survive")
    code, err = run_fid_stats(capsys, "--images", str(images_npz), "--out", str(ckpt))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--out {ckpt} exists and is not a reference-statistics .npz" in err and "--overwrite" in err
    assert ckpt.read_bytes() == b"weights that must survive"


@pytest.mark.parametrize("existing", ["stats", "other", "absent"])
def test_fid_stats_output_check_lets_statistics_new_files_and_overwrite_through(images_npz, tmp_path, existing):
    out = tmp_path / "ref.npz"
    if existing == "stats":
        np.savez(out, mu=np.zeros(2), sigma=np.eye(2))
    elif existing == "other":
        out.write_bytes(b"not statistics")
    fid_stats.check_output(out, images_npz, overwrite=existing == "other")  # no error
    if existing == "other":
        with pytest.raises(BadInput, match="not a reference-statistics"):
            fid_stats.check_output(out, images_npz)


def test_fid_stats_help_documents_overwrite(capsys):
    with pytest.raises(SystemExit):
        fid_stats.main(["--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_reference_stats_that_are_not_npz_say_so_without_pickle(tmp_path):
    png = tmp_path / "some.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    with pytest.raises(BadInput) as e:
        load_reference_stats(png)
    msg = str(e.value)
    assert msg.startswith(f"{png}: not an .npz file of reference statistics") and "pickle" not in msg


def test_resume_refuses_n_steps_below_the_checkpoint_step(tmp_path):
    tokens, labels = synthetic_tokens()
    first = Trainer(tiny_config(tmp_path, n_steps=4, save_interval=2), tokens, labels)
    assert first.fit() == 4
    files = {p: digest(p) for p in first.run_dir.rglob("*") if p.is_file()}
    shorter = Trainer(tiny_config(tmp_path, n_steps=2, save_interval=2), tokens, labels)
    with pytest.raises(BadInput) as e:
        shorter.fit()
    msg = str(e.value)
    assert "\n" not in msg and "train.n_steps=2 is below the checkpoint's step 4" in msg
    assert "--config.train.n_steps=4 or more" in msg
    assert {p: digest(p) for p in first.run_dir.rglob("*") if p.is_file()} == files  # nothing rewritten


def test_extract_refuses_negative_stop_after_chunks(tmp_path, capsys):
    code = extract_imagenet_feature.main(["--config", "configs/tiny.py", "--path", str(tmp_path), "--split",
                                          "train", "--device", "cpu", "--stop-after-chunks", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --stop-after-chunks must be 0 (off) or a chunk count, got -1"
