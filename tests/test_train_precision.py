"""Mixed-precision training on the CPU: bf16 through train_graph.py with exact resume and the non-finite stop,
fp16 autocast with torch.amp's CPU loss scaler, a forced gradient overflow that the scaler skips and counts."""
import csv
import hashlib
import math

import pytest
import torch
from safetensors.torch import load_file
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import train_graph
from libs.training import trainer as trainer_module
from libs.training.trainer import NonFiniteError, Trainer, enable_fp16_on_cpu
from tests.helpers import (ka_mig_trainer, synthetic_tokens, tiny_backbone, tiny_config, tiny_graphs,
                           write_training_token_dir)

FP16_INIT_SCALE = 2.0 ** 16  # GradScaler's default initial scale (accelerate's on a GPU, ours on a CPU)
FP16_CPU_WARNING = "mixed_precision=fp16 on a CPU"
pytestmark = pytest.mark.filterwarnings(f"ignore:train.{FP16_CPU_WARNING}")  # asserted where it is the point


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate allows one mixed precision per process: every test here starts and ends with none chosen."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logits_dtypes(trainer) -> list:
    """Records the dtype of the head's output at every training forward of `trainer` (a list it appends to)."""
    seen = []
    trainer.unwrapped.mlm_layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def force_overflow(trainer, steps, factor=2.0 ** 24):
    """At the given (1-based) steps the gradient of the fp16 logits is multiplied by `factor` in fp16: it
    overflows to inf there, as a too-large loss scale would, while the loss itself stays finite."""
    def hook(module, args, out):
        if trainer.step + 1 in steps and out.requires_grad:
            out.register_hook(lambda g: g * factor)
    trainer.unwrapped.mlm_layer.register_forward_hook(hook)


# ----------------------------------------------------------------------------- what accelerate does on a CPU


def test_accelerate_runs_fp16_on_a_cpu_in_float32_until_the_trainer_switches_autocast_and_scaler_on():
    x, lin = torch.randn(2, 4), torch.nn.Linear(4, 4)
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    assert acc.mixed_precision == "fp16" and acc.scaler is None  # accepted without error ...
    with acc.autocast():
        assert lin(x).dtype == torch.float32  # ... and silently float32
    with pytest.warns(UserWarning, match=FP16_CPU_WARNING):  # slow there: says so
        enable_fp16_on_cpu(acc)
    assert isinstance(acc.scaler, torch.amp.GradScaler) and acc.scaler._device == "cpu"
    with acc.autocast():
        assert lin(x).dtype == torch.float16
    AcceleratorState._reset_state()
    for other in ("bf16", "no"):  # the switch touches fp16 only
        acc = Accelerator(mixed_precision=other, cpu=True)
        native = acc.native_amp
        enable_fp16_on_cpu(acc)
        assert acc.scaler is None and acc.native_amp == native
        AcceleratorState._reset_state()


# ----------------------------------------------------------------------------- bf16 end to end


def cli_args(tmp_path, data, out, n_steps, precision=None):
    args = ["--config", "configs/tiny.py", f"--config.data.path={data}", f"--config.output_dir={tmp_path / out}",
            f"--config.train.n_steps={n_steps}", "--config.train.save_interval=2"]
    return args + ([f"--config.train.mixed_precision={precision}"] if precision else [])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_graph_in_mixed_precision_on_cpu_resumes_to_the_same_bytes(tmp_path, precision, monkeypatch, capsys):
    data = write_training_token_dir(tmp_path / "tokens")
    assert train_graph.main(cli_args(tmp_path, data, "full", 4, precision)) == 0
    assert f"mixed precision {precision}" in capsys.readouterr().out
    AcceleratorState._reset_state()
    train_graph.main(cli_args(tmp_path, data, "cut", 2, precision))  # stops after step 2 (its checkpoint)
    AcceleratorState._reset_state()
    monkeypatch.setenv(train_graph.PRECISION_ENV, precision)  # the resumed segment takes accelerate's variable
    train_graph.main(cli_args(tmp_path, data, "cut", 4))
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 2" in out and f"mixed precision {precision}" in out
    monkeypatch.delenv(train_graph.PRECISION_ENV)
    full, cut = tmp_path / "full" / "tiny", tmp_path / "cut" / "tiny"
    for name in ("checkpoints/step_0000004.pt", "model_ema.safetensors"):
        assert sha256(full / name) == sha256(cut / name), name
    AcceleratorState._reset_state()
    train_graph.main(cli_args(tmp_path, data, "fp32", 4, "no"))
    low = load_file(full / "model_ema.safetensors")
    fp32 = load_file(tmp_path / "fp32" / "tiny" / "model_ema.safetensors")
    # autocast did change the arithmetic (fp16 once fell back to float32 on a CPU: equal weights) ...
    assert any(not torch.equal(low[k], fp32[k]) for k in fp32)
    # ... by the rounding of the low precision only
    assert max(float((low[k] - fp32[k]).abs().max()) for k in fp32) < 1e-3
    scaler = torch.load(full / "checkpoints" / "step_0000004.pt", weights_only=True)["scaler"]
    assert (scaler is not None) == (precision == "fp16")


def test_bf16_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    run, _ = ka_mig_trainer(tmp_path, n_steps=10, save_interval=100, mixed_precision="bf16")
    seen = logits_dtypes(run)
    assert run.scaler is None  # bf16 needs no loss scaler: a non-finite value stops the run
    loss_fn = trainer_module.masked_token_loss
    monkeypatch.setattr(trainer_module, "masked_token_loss", lambda logits, batch, smoothing:
                        loss_fn(logits, batch, smoothing) * (math.nan if run.step == 2 else 1.0))
    run.train_step()
    run.train_step()
    before, ema = run.trained_state(), {k: v.clone() for k, v in run.ema.items()}
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss"):
        run.train_step()
    assert seen == [torch.bfloat16] * 3
    after = run.trained_state()
    assert run.step == 2 and all(torch.equal(before[k], after[k]) and torch.equal(ema[k], run.ema[k]) for k in ema)


# ----------------------------------------------------------------------------- fp16 with the CPU loss scaler


def test_fp16_on_cpu_runs_under_autocast_with_a_cpu_loss_scaler(tmp_path):
    run, _ = ka_mig_trainer(tmp_path / "fp16", n_steps=3, save_interval=100, mixed_precision="fp16")
    seen = logits_dtypes(run)
    scaler = run.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cpu" and scaler.is_enabled()
    run.fit()
    assert seen == [torch.float16] * 3 and run.skipped_total == 0
    assert scaler.get_scale() == FP16_INIT_SCALE  # no overflow, no growth yet (growth_interval 2000)
    AcceleratorState._reset_state()
    fp32, _ = ka_mig_trainer(tmp_path / "fp32", n_steps=3, save_interval=100, mixed_precision="no")
    fp32.fit()
    low, ref = run.trained_state(), fp32.trained_state()
    assert any(not torch.equal(low[k], ref[k]) for k in ref)  # trained in fp16, not in a float32 fallback
    assert max(float((low[k] - ref[k]).abs().max()) for k in ref) < 1e-3


def test_fp16_overflow_is_skipped_counted_and_logged(tmp_path, capsys):
    run, _ = ka_mig_trainer(tmp_path, n_steps=10, save_interval=100, mixed_precision="fp16")
    force_overflow(run, {3})
    run.train_step()
    run.train_step()
    before, ema = run.trained_state(), {k: v.clone() for k, v in run.ema.items()}
    stats = run.train_step()
    # the loss is finite: only the fp16 gradients overflowed, and the scaler skipped the update
    assert math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"])
    assert stats["skipped_steps"] == 1 and run.skipped_total == 1 and run.skipped_run == 1 and run.step == 3
    after = run.trained_state()
    assert all(torch.equal(before[k], after[k]) and torch.equal(ema[k], run.ema[k]) for k in ema)
    assert run.scaler.get_scale() == FP16_INIT_SCALE / 2
    assert "step 3: the fp16 loss scaler skipped the update" in capsys.readouterr().out
    stats = run.train_step()  # the halved scale fits: the next update is applied
    assert math.isfinite(stats["grad_norm"]) and run.skipped_run == 0 and stats["skipped_steps"] == 1
    assert any(not torch.equal(after[k], v) for k, v in run.trained_state().items())


def test_fp16_overflow_run_stops_when_the_scaler_gives_up(tmp_path):
    run, _ = ka_mig_trainer(tmp_path, n_steps=10, save_interval=2, mixed_precision="fp16", max_skipped_steps=2)
    force_overflow(run, set(range(3, 11)))
    with pytest.raises(NonFiniteError, match=r"step 5: .*skipped 3 steps in a row.*max_skipped_steps = 2"):
        run.fit()
    assert run.scaler.get_scale() == FP16_INIT_SCALE / 8 and run.skipped_total == 3


def test_fp16_resume_after_an_overflow_gives_the_same_bytes(tmp_path):
    backbone = tmp_path / "backbone.pth"  # one file, so that the configs stored in checkpoints are equal
    torch.save(tiny_backbone(depth=2).state_dict(), backbone)
    tokens, labels = synthetic_tokens()

    def trainer(folder):
        AcceleratorState._reset_state()
        config = tiny_config(tmp_path / folder, "ka_mig", n_steps=6, save_interval=2, log_interval=1,
                             mixed_precision="fp16", init_checkpoint=str(backbone))
        run = Trainer(config, tokens, labels, graphs=tiny_graphs())
        force_overflow(run, {3})
        return run

    trainer("full").fit()
    trainer("cut").fit(stop_after=4)
    resumed = trainer("cut")
    resumed.fit()
    assert resumed.skipped_total == 1  # the count came back from the checkpoint
    full, cut = tmp_path / "full" / "out" / "tiny", tmp_path / "cut" / "out" / "tiny"
    for name in ("checkpoints/step_0000006.pt", "model_ema.safetensors"):
        assert sha256(full / name) == sha256(cut / name), name
    state = torch.load(full / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert state["skipped_steps"] == {"total": 1, "in_a_row": 0}
    assert state["scaler"]["scale"] == FP16_INIT_SCALE / 2  # the halved scale is what a resume must restore
    for log in (full, cut):
        assert [int(r["skipped_steps"]) for r in read_log(log / "log.csv")] == [0, 0, 1, 1, 1, 1]
