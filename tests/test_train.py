"""Training: frozen backbone in ka_mig mode, exact resume, loss goes down, 2-process torchrun + kill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from libs.models.ka_mig import GraphConfig, KAMIG
from libs.checkpoint import load_state_dict_file, load_strict, weights_format, weights_metadata
from libs.training.trainer import Trainer, init_model, stored_config
from tests.helpers import (ka_mig_trainer, synthetic_tokens, tiny_backbone, tiny_config, tiny_graphs, tiny_vqgan,
                           write_reference_stats, write_training_token_dir)

REPO = Path(__file__).resolve().parents[1]


def test_ka_mig_mode_trains_only_graph_modules_and_head(tmp_path):
    trainer, backbone = ka_mig_trainer(tmp_path, n_steps=3, save_interval=100)
    trainer.fit()
    model = trainer.unwrapped
    frozen = {k: v for k, v in backbone.state_dict().items() if not k.startswith("mlm_layer.")}
    for name, p in model.named_parameters():
        if name.startswith(("graph_layer.", "mlm_layer.")):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, frozen[name]), name  # bit-identical after training
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if n.startswith(("graph_layer.", "mlm_layer."))}
    assert set(trainer.ema) == set(trainer.trained_names)
    changed = [n for n, p in model.named_parameters() if n.startswith("graph_layer.zero_convs.")
               and p.abs().sum() > 0]
    assert changed  # the zero convs did move
    exported = load_state_dict_file(trainer.run_dir / "model_ema.safetensors")
    fresh = KAMIG(model.cfg, GraphConfig(), tiny_graphs())
    load_strict(fresh, exported)  # the export loads strictly, like graph_nnet_ema.pth
    assert weights_format(trainer.run_dir / "model_ema.safetensors") == "safetensors"  # weights only, no pickle
    config = json.loads(weights_metadata(trainer.run_dir / "model_ema.safetensors")["config"])
    assert config == stored_config(trainer.config)  # the config that built it
    assert config["train"]["n_steps"] == 3 and "graph" in config


def test_resume_is_bit_identical(tmp_path):
    a, _ = ka_mig_trainer(tmp_path / "a", n_steps=6, save_interval=3)
    a.fit()
    b, _ = ka_mig_trainer(tmp_path / "b", n_steps=6, save_interval=3)
    b.fit(stop_after=3)
    c, _ = ka_mig_trainer(tmp_path / "b", n_steps=6, save_interval=3)  # a new process would do this
    assert c.step == 0
    c.fit()
    assert c.step == 6
    for n, v in a.trained_state().items():
        assert torch.equal(v, c.trained_state()[n]), n
        assert torch.equal(a.ema[n], c.ema[n]), n


def test_truncated_checkpoint_is_skipped(tmp_path, capsys):
    a, _ = ka_mig_trainer(tmp_path, n_steps=4, save_interval=2, keep_checkpoints=5)
    a.fit()
    ckpts = sorted((a.run_dir / "checkpoints").glob("step_*.pt"))
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])
    b, _ = ka_mig_trainer(tmp_path, n_steps=4, save_interval=2, keep_checkpoints=5)
    b.resume()
    assert b.step == 2
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["pretrain", "ka_mig"])
def test_loss_decreases(tmp_path, mode):
    if mode == "pretrain":
        config = tiny_config(tmp_path, n_steps=150, batch_size=32, save_interval=1000, lr=2e-3)
        tokens, labels = synthetic_tokens()
        trainer = Trainer(config, tokens, labels)
    else:
        # only the graph modules and the head learn on top of a frozen random backbone: a smaller drop
        trainer, _ = ka_mig_trainer(tmp_path, n_steps=150, batch_size=32, save_interval=1000, lr=5e-3)
    losses = []
    for _ in range(150):
        losses.append(trainer.train_step()["loss"])
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < first - (0.3 if mode == "pretrain" else 0.1), (first, last)


def test_missing_backbone_names_the_asset(tmp_path):
    config = tiny_config(tmp_path, "ka_mig")
    config.train.init_checkpoint = str(tmp_path / "assets" / "nnet_ema.pth")
    with pytest.raises(FileNotFoundError, match="nnet_ema.pth"):
        init_model(config, graphs=tiny_graphs())


def run_torchrun(tmp_path, data, out, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "train_graph.py", "--config", "configs/tiny.py",
           f"--config.data.path={data}", f"--config.output_dir={out}", "--config.train.n_steps=6",
           "--config.train.save_interval=3", "--config.train.batch_size=16", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_killed_and_resumed_matches_uninterrupted(tmp_path):
    data = write_training_token_dir(tmp_path / "tokens")
    full = run_torchrun(tmp_path, data, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "2 processes" in full.stdout + full.stderr
    crashed = run_torchrun(tmp_path, data, tmp_path / "resumed", ["--crash-after-step=3"])
    assert crashed.returncode != 0
    assert not (tmp_path / "resumed" / "tiny" / "model_ema.safetensors").exists()
    resumed = run_torchrun(tmp_path, data, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(tmp_path / "full" / "tiny" / "model_ema.safetensors")
    b = load_file(tmp_path / "resumed" / "tiny" / "model_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(tmp_path / "full" / "tiny" / "checkpoints" / "step_0000006.pt", weights_only=False)
    cb = torch.load(tmp_path / "resumed" / "tiny" / "checkpoints" / "step_0000006.pt", weights_only=False)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    from tests.test_tracking import curves  # TensorBoard: rank 0 alone writes, one event file per segment
    for run, segments in (("full", 1), ("resumed", 2)):
        assert len(list((tmp_path / run / "tiny" / "tb").glob("events.out.tfevents.*"))) == segments, run
    full_tb, resumed_tb = curves(tmp_path / "full" / "tiny"), curves(tmp_path / "resumed" / "tiny")
    assert {k: [s for s, _ in v] for k, v in full_tb.items()} == {k: [s for s, _ in v] for k, v in resumed_tb.items()}
    assert [s for s, _ in full_tb["train/loss"]] == [5, 6] and full_tb["train/loss"] == resumed_tb["train/loss"]


def test_periodic_fid_is_logged_and_never_stored_in_checkpoints(tmp_path, fid_extractor):
    import functools
    from libs.training.periodic_fid import periodic_fid
    torch.save(tiny_vqgan().state_dict(), tmp_path / "vq.ckpt")
    config = tiny_config(tmp_path, n_steps=2, save_interval=2, fid_interval=2, fid_samples=4)
    config.tokenizer.checkpoint = str(tmp_path / "vq.ckpt")
    config.train.fid_ref_stats = str(write_reference_stats(tmp_path / "ref.npz", fid_extractor))
    tokens, labels = synthetic_tokens()
    trainer = Trainer(config, tokens, labels)
    trainer.fit(eval_fn=functools.partial(periodic_fid, extractor=fid_extractor, batch_size=4))
    rows = (trainer.run_dir / "fid.csv").read_text().splitlines()
    assert rows[0].startswith("step,fid") and rows[1].startswith("2,") and len(rows) == 2
    state = torch.load(trainer.run_dir / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert "fid" not in state and set(state) == {"model", "ema", "optimizer", "scaler", "step", "config",
                                                 "trained_params", "rng", "skipped_steps", "processes"}


def test_compiled_training_matches_eager_and_saves_eager_names(tmp_path):
    """train.compile: the same losses as eager (float rounding), and checkpoints that load into an eager model."""
    tokens, labels = synthetic_tokens()
    losses = {}
    for compiled in (False, True):
        config = tiny_config(tmp_path / str(compiled), "pretrain", n_steps=2, compile=compiled)
        trainer = Trainer(config, tokens, labels)
        losses[compiled] = [trainer.train_step()["loss"] for _ in range(2)]
        state = trainer.export_ema()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    load_strict(tiny_backbone(depth=2), state)  # no `_orig_mod.` names
