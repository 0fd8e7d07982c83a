"""Entry scripts end a user error with one line `error: ...` on stderr and exit status 2, never a traceback.

Every case runs the real command in a subprocess; all of them start at once (they are independent) and each
test checks one result.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_backbone, tiny_vqgan

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py", "--config.model.depth=4"]  # the depth of tests.helpers.tiny_backbone


def cases(root: Path) -> dict:
    """{case name: argv after the python executable} for the inputs written under root."""
    vq, net = root / "vq.ckpt", root / "backbone.pth"
    missing = root / "absent"
    tok = [f"--config.tokenizer.checkpoint={vq}"]
    gen_img = ["generate_img.py", *TINY, *tok, "--model", "autonat", "--checkpoint", str(net), "--device", "cpu",
               "--classes", "1", "--per-class", "1", "--out", str(root / "img_out")]
    gen_npz = ["generate_npz.py", *TINY, *tok, "--model", "autonat", "--checkpoint", str(net), "--device", "cpu",
               "--num-samples", "2", "--out", str(root / "npz_out")]
    extract = ["extract_imagenet_feature.py", *TINY, "--path", str(root / "data"), "--split", "train",
               "--workers", "0", "--device", "cpu", "--out", str(root / "tok_out")]
    graphs = ["-m", "graph_construction.build_graphs", *TINY, "--out", str(root / "graph_out")]
    fid = ["-m", "libs.evaluation.fid_stats", "--out", str(root / "ref_out.npz"), "--device", "cpu"]
    return {
        "generate_img missing checkpoint": gen_img + ["--checkpoint", str(missing / "nnet_ema.pth")],
        "generate_img tokenizer does not fit": gen_img + ["--config.tokenizer.codebook_size=64"],
        "generate_img unknown flag": gen_img + ["--bogus"],
        "generate_npz missing reference": gen_npz + ["--ref-stats", str(missing / "ref.npz")],
        "generate_npz NaN reference": gen_npz + ["--ref-stats", str(root / "nan_ref.npz")],
        "generate_npz missing graphs": ["generate_npz.py", *TINY, *tok, "--model", "ka_mig", "--checkpoint", str(net),
                                        f"--config.graph.dir={missing}", "--no-fid", "--device", "cpu",
                                        "--out", str(root / "npz_out2")],
        "extract missing tokenizer": extract + [f"--config.tokenizer.checkpoint={missing / 'vq.ckpt'}"],
        "extract missing images": extract[:5] + [str(missing)] + extract[6:] + tok,
        "extract bad batch size": extract + tok + ["--batch-size", "0"],
        "build_graphs missing tokens": graphs + ["--tokens", str(missing / "tokens")],
        "build_graphs damaged tokens": graphs + ["--tokens", str(root / "damaged.npy")],
        "fid_stats missing images": fid + ["--images", str(missing / "imgs")],
        "fid_stats npz without arr_0": fid + ["--images", str(root / "no_arr0.npz")],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case: CompletedProcess-like (returncode, stderr)} of every case, run concurrently."""
    root = tmp_path_factory.mktemp("cli")
    torch.save({"state_dict": tiny_vqgan().state_dict()}, root / "vq.ckpt")
    torch.save(tiny_backbone().state_dict(), root / "backbone.pth")
    mu = np.zeros(2048)
    mu[5] = np.nan
    np.savez(root / "nan_ref.npz", mu=mu, sigma=np.eye(2048))
    np.savez(root / "no_arr0.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    (root / "damaged.npy").write_bytes(b"\x93NUMPY garbage that is not an array")
    (root / "data" / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "data" / "train" / "a" / "x.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, argv in cases(root).items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = (p.returncode, stderr, root)
    return out


@pytest.mark.parametrize("case", list(cases(Path("/x"))))
def test_user_error_is_one_line_exit_2(results, case):
    code, stderr, root = results[case]
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]


def test_messages_name_the_problem(results):
    """A few messages, checked for what they must say."""
    def line(case):
        return results[case][1].strip()
    assert "nnet_ema.pth" in line("generate_img missing checkpoint")
    assert "codebook 64" in line("generate_img tokenizer does not fit")
    assert "--bogus" in line("generate_img unknown flag")
    assert "NaN" in line("generate_npz NaN reference") and "nan_ref.npz" in line("generate_npz NaN reference")
    assert "graph file not found" in line("generate_npz missing graphs")
    assert "damaged.npy" in line("build_graphs damaged tokens")
    assert "arr_0" in line("fid_stats npz without arr_0")
    root = results["generate_npz NaN reference"][2]
    assert not (root / "npz_out" / "samples").exists() or not any((root / "npz_out" / "samples").iterdir())


def test_mistyped_config_value_is_one_line_naming_the_key(tmp_path):
    """A --config value of the wrong type is a one-line user error naming the key, not a traceback."""
    proc = subprocess.run([sys.executable, "train_graph.py", "--config", "configs/tiny.py",
                           "--config.train.lr=abc"], capture_output=True, text=True, cwd=REPO)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "config.train.lr=abc" in lines[0] and "Traceback" not in proc.stderr


def test_output_check_leaves_no_folders_behind(tmp_path):
    from libs.cli import check_writable
    check_writable(tmp_path / "a" / "b" / "samples.npz", folders=[tmp_path / "c" / "d"])
    assert list(tmp_path.iterdir()) == []
