"""NaN/inf logits stop sampling, editing, the held-out NLL and the strategy search with one line naming the step,
the precision and what to try (exit status 1); nothing of the non-finite batch is written."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from libs.cli import run_main
from libs.errors import NonFiniteValues
from libs.evaluation.nll import masked_nll
from libs.nonfinite import NonFiniteLogits, all_finite, first_false
from libs.sampling.decoding import generate, maskgit_schedule
from libs.sampling.generation import sample_images
from tests.helpers import REPO, tiny_backbone, tiny_vqgan

TINY = ["--config", "configs/tiny.py", "--config.model.depth=4"]  # the depth of tests.helpers.tiny_backbone


def nan_head(model):
    """`model` with a NaN output bias: every logit is NaN, in any precision."""
    with torch.no_grad():
        model.mlm_layer.bias.fill_(float("nan"))
    return model


def fp16_overflow(model):
    """`model` whose first block's MLP output is scaled by 1e6: finite logits in fp32 and bf16, NaN in fp16."""
    with torch.no_grad():
        model.in_blocks[0].mlp.fc2.weight.mul_(1e6)
        model.in_blocks[0].mlp.fc2.bias.mul_(1e6)
    return model


class NaNFromCall:
    """A token model that gives NaN logits from its `n`-th call on (0-based), the model's own before."""

    def __init__(self, model, n):
        self.model, self.n, self.calls = model, n, 0

    def __call__(self, ids, class_ids):
        logits = self.model(ids, class_ids)
        self.calls += 1
        return logits if self.calls <= self.n else torch.full_like(logits, float("nan"))


def decode(model, schedule, precision=None, **kw):
    """generate() of 4 class-conditional samples under autocast `precision` (None: fp32)."""
    with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
        return generate(model, torch.arange(4), schedule, seq_len=16, mask_token_id=32, null_class_id=4,
                        generator=torch.Generator().manual_seed(0), **kw)


def test_nan_logits_stop_decoding_naming_the_first_bad_step():
    schedule = maskgit_schedule(6, 2.0)
    for n in (0, 3, 5):
        with pytest.raises(NonFiniteLogits) as e:
            decode(NaNFromCall(tiny_backbone(), n), schedule)
        assert e.value.step == n and e.value.precision == "fp32"
        assert f"decoding step {n + 1} of 6 under precision fp32" in str(e.value)
        assert "check the checkpoint" in str(e.value)
    ids = decode(NaNFromCall(tiny_backbone(), 6), schedule)  # six finite steps: samples as always
    assert torch.equal(ids, decode(tiny_backbone(), schedule))


def test_fp16_overflow_is_named_with_what_to_try():
    model, schedule = fp16_overflow(tiny_backbone()), maskgit_schedule(4, 2.0)
    decode(model, schedule)  # finite in fp32 ...
    decode(model, schedule, torch.bfloat16)  # ... and bf16
    with pytest.raises(NonFiniteLogits, match=r"step 1 of 4 under precision fp16; .*try --precision fp32 or bf16"):
        decode(model, schedule, torch.float16)


def test_editing_with_nan_logits_stops():
    known = torch.zeros(4, 16, dtype=torch.bool)
    known[:, :8] = True  # the first half is kept, the rest regenerated
    init = torch.randint(0, 32, (4, 16))
    with pytest.raises(NonFiniteLogits, match="step 1 of 4"):
        decode(nan_head(tiny_backbone()), maskgit_schedule(4, 2.0), init_ids=init, known=known)


def test_sample_images_names_its_precision():
    with pytest.raises(NonFiniteLogits, match="step 1 of 3 under precision bf16; .*; try --precision fp32$"):
        sample_images(nan_head(tiny_backbone()), tiny_vqgan(), torch.arange(4), maskgit_schedule(3, 1.0),
                      torch.Generator().manual_seed(0), precision="bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_equals_isfinite_all(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, generator=gen) * 100).to(dtype)
    assert all_finite(x).item() and all_finite(x[:0]).item()
    assert all_finite(torch.full((4, 3), torch.finfo(dtype).max, dtype=dtype)).item()  # largest finite values
    for value in (float("nan"), float("inf"), float("-inf")):
        for _ in range(5):
            y = x.clone()
            y.view(-1)[int(torch.randint(0, y.numel(), (1,), generator=gen))] = value
            assert all_finite(y).item() is False == torch.isfinite(y).all().item()


def test_first_false_reads_flags_once():
    flags = [torch.tensor(True), torch.tensor(True), torch.tensor(False), torch.tensor(False)]
    assert first_false(flags) == 2 and first_false(flags[:2]) == -1 and first_false([]) == -1


class NaNForClass(torch.nn.Module):
    """A token model whose logits are NaN for the images of class `bad` only."""

    def __init__(self, bad):
        super().__init__()
        self.model, self.bad = tiny_backbone(), bad
        self.mask_token_id = self.model.mask_token_id

    def forward(self, ids, class_ids):
        logits = self.model(ids, class_ids)
        return torch.where((class_ids == self.bad)[:, None, None], torch.full_like(logits, float("nan")), logits)


def test_masked_nll_stops_naming_the_image_and_ratio():
    tokens = torch.randint(0, 32, (10, 16))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 3])
    ok = masked_nll(NaNForClass(bad=5).eval(), tokens, labels, [0.5, 0.9], batch_size=4)  # no such class
    assert np.isfinite(ok).all()
    with pytest.raises(NonFiniteLogits) as e:
        masked_nll(NaNForClass(bad=3).eval(), tokens, labels, [0.5, 0.9], batch_size=4)
    assert "image 7 at mask ratio 0.5 (2 of 8 values in images 4..7) under precision fp32" in str(e.value)


def test_run_main_ends_nonfinite_values_with_one_line_and_status_1(capsys):
    def main(argv):
        raise NonFiniteLogits("sampling stopped: NaN at decoding step 2 of 8 under precision fp16")
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 1 == NonFiniteValues.exit_status
    assert capsys.readouterr().err == "error: sampling stopped: NaN at decoding step 2 of 8 under precision fp16\n"


def test_strategy_search_stops_before_logging_a_nan_evaluation(tmp_path, monkeypatch):
    from libs.sampling import strategy_search as ss
    root = tmp_path
    torch.save({"state_dict": tiny_vqgan().state_dict()}, root / "vq.ckpt")
    torch.save(nan_head(tiny_backbone()).state_dict(), root / "nan.pth")
    np.savez(root / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr(ss, "load_feature_extractor", lambda *a, **k: None)  # never reached: sampling stops first
    with pytest.raises(NonFiniteLogits, match="step 1 of 8 under precision fp32"):
        ss.main([*TINY, f"--config.tokenizer.checkpoint={root / 'vq.ckpt'}", "--model", "autonat",
                 "--checkpoint", str(root / "nan.pth"), "--num-samples", "2", "--batch-size", "2",
                 "--iterations", "1", "--offspring", "1", "--ref-stats", str(root / "ref.npz"), "--device", "cpu",
                 "--out", str(root / "search")])
    log = (root / "search" / ss.LOG_FILE).read_text().splitlines()
    assert len(log) == 1 and '"settings"' in log[0]  # the settings line only: no evaluation was logged


def test_generate_npz_fp16_overflow_exits_1_without_samples(tmp_path):
    """The end-to-end case: fp16 NaN logits used to become identical images and exit 0."""
    torch.save({"state_dict": tiny_vqgan().state_dict()}, tmp_path / "vq.ckpt")
    torch.save(fp16_overflow(tiny_backbone()).state_dict(), tmp_path / "overflow.pth")
    base = [sys.executable, "generate_npz.py", *TINY, f"--config.tokenizer.checkpoint={tmp_path / 'vq.ckpt'}",
            "--model", "autonat", "--checkpoint", str(tmp_path / "overflow.pth"), "--num-samples", "4",
            "--batch-size", "2", "--no-fid", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = {p: subprocess.Popen(base + ["--precision", p, "--out", str(tmp_path / p)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in ("fp16", "fp32")}
    (_, err16), (_, err32) = (runs[p].communicate(timeout=300) for p in ("fp16", "fp32"))
    assert runs["fp32"].returncode == 0, err32[-2000:]
    assert len(np.load(tmp_path / "fp32" / "samples.npz")["arr_0"]) == 4
    lines = [line for line in err16.splitlines() if line.strip() and "sampling:" not in line]  # tqdm bar aside
    assert runs["fp16"].returncode == 1 and "Traceback" not in err16, err16[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: sampling stopped:"), err16[-3000:]
    assert "NaN/inf at decoding step 1 of 8 under precision fp16" in lines[0] and "--precision fp32" in lines[0]
    assert not (tmp_path / "fp16" / "samples.npz").exists()
    assert not list((tmp_path / "fp16" / "samples").glob("*.png"))


# ----------------------------------------------------------------------------- the MaskGIT release's sampler


def maskgit_decode_run(model, precision=None, **kw):
    """libs.sampling.maskgit_decode.decode of 4 samples in 4 steps (tiny MaskGIT sizes) under autocast."""
    from libs.sampling.maskgit_decode import decode as release_decode
    with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
        return release_decode(model, torch.arange(4), seq_len=16, mask_token_id=36, steps=4, null_class_id=4,
                              generator=torch.Generator().manual_seed(0), **kw)


def tiny_release_maskgit():
    from libs.models.maskgit import MaskGIT, MaskGITConfig
    torch.manual_seed(0)
    return MaskGIT(MaskGITConfig(codebook_size=32, seq_len=16, num_classes=4, embed_dim=32, depth=2, num_heads=2,
                                 dropout=0.0)).eval()


def test_maskgit_decode_stops_at_nan_logits_naming_the_step():
    model = tiny_release_maskgit()
    assert model.mask_token_id == 36
    for n in (0, 2, 3):
        with pytest.raises(NonFiniteLogits) as e:
            maskgit_decode_run(NaNFromCall(model, n))
        assert e.value.step == n and f"decoding step {n + 1} of 4 under precision fp32" in str(e.value)
    with pytest.raises(NonFiniteLogits, match="decoding step 3 of 4"):  # editing from step 2: steps keep their numbers
        maskgit_decode_run(NaNFromCall(model, 0), start_iter=2)
    with pytest.raises(NonFiniteLogits, match="decoding step 3 of 4"):  # the guided pass (one call per step)
        maskgit_decode_run(NaNFromCall(model, 2), guidance=[1.0] * 4)
    assert torch.equal(maskgit_decode_run(NaNFromCall(model, 4)), maskgit_decode_run(model))  # four finite steps


def test_maskgit_decode_names_fp16_overflow():
    model = tiny_release_maskgit()
    with torch.no_grad():  # the first MLP's output x 1e8: finite after its LayerNorm in fp32 and bf16, inf in fp16
        model.layers[0].mlp.layer_output.weight.mul_(1e8)
        model.layers[0].mlp.layer_output.bias.mul_(1e8)
    maskgit_decode_run(model)
    maskgit_decode_run(model, torch.bfloat16)
    with pytest.raises(NonFiniteLogits, match=r"step 1 of 4 under precision fp16; .*try --precision fp32 or bf16"):
        maskgit_decode_run(model, torch.float16)
