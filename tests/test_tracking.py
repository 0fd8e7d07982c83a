"""Experiment tracking: TensorBoard curves in the run folder, exact on resume; FID and sample grid; none; wandb."""
import csv
import functools
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from libs.config_schema import check_config
from libs.errors import BadInput, UserError
from libs.training import tracking
from libs.training.trainer import Trainer
from tests.helpers import synthetic_tokens, tiny_config, tiny_vqgan, write_reference_stats

TRAIN_TAGS = {f"train/{k}" for k in tracking.TRAIN_SCALARS}


def events(run_dir):
    """EventAccumulator of <run_dir>/tb with every event kept (purged steps dropped, as TensorBoard shows)."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def curves(run_dir) -> dict:
    """{tag: [(step, value)]} of the run's scalars."""
    acc = events(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(tmp_path, name, stop_after=None, **train):
    config = tiny_config(tmp_path, n_steps=4, log_interval=1, save_interval=2, **train)
    config.run_name = name
    trainer = Trainer(config, *synthetic_tokens())
    try:
        trainer.fit(stop_after=stop_after)
    finally:
        trainer.close()
    return trainer.run_dir


def test_resumed_tensorboard_curve_has_each_step_once(tmp_path):
    """Steps 1-3, then a resume from the step-2 checkpoint (step 3 logged twice on disk): every scalar has the
    steps 1..4 once, with the values of the uninterrupted run (tokens/s is a time)."""
    whole = curves(train(tmp_path, "whole"))
    first_dir = train(tmp_path, "resumed", stop_after=3)  # checkpoint at 2; step 3 logged, then lost
    [first] = (first_dir / "tb").glob("events.out.tfevents.*")
    # as if written by another process whose id sorts after ours, in a second the resume starts in (a clock a
    # little ahead): the new file must still come last
    first.rename(first.with_name(f"events.out.tfevents.{int(time.time()) + 2:010d}.host.99999999.0"))
    resumed_dir = train(tmp_path, "resumed")
    resumed = curves(resumed_dir)
    assert len(list((resumed_dir / "tb").glob("events.out.tfevents.*"))) == 2
    assert set(whole) == set(resumed) == TRAIN_TAGS
    for tag in TRAIN_TAGS:
        assert [s for s, _ in whole[tag]] == [s for s, _ in resumed[tag]] == [1, 2, 3, 4], tag
        if tag != "train/tokens_per_s":
            assert [v for _, v in resumed[tag]] == [v for _, v in whole[tag]], tag
    with open(resumed_dir / "log.csv") as f:  # the CSV log stays, and the curve is its values
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [v for _, v in resumed["train/loss"]] == [np.float32(float(r["loss"])) for r in rows]


def test_log_with_none_writes_no_events_and_keeps_the_csv_log(tmp_path):
    run_dir = train(tmp_path, "plain", log_with="none")
    assert not (run_dir / "tb").exists()
    assert (run_dir / "log.csv").read_text().count("\n") == 5  # header + 4 steps


def test_periodic_fid_logs_fid_and_a_labelled_grid(tmp_path, fid_extractor):
    from libs.sampling.generation import labelled_grid
    from libs.training.periodic_fid import periodic_fid
    torch.save(tiny_vqgan().state_dict(), tmp_path / "vq.ckpt")
    config = tiny_config(tmp_path, n_steps=2, save_interval=2, fid_interval=2, fid_samples=4)
    config.tokenizer.checkpoint = str(tmp_path / "vq.ckpt")
    config.train.fid_ref_stats = str(write_reference_stats(tmp_path / "ref.npz", fid_extractor))
    trainer = Trainer(config, *synthetic_tokens())
    trainer.fit(eval_fn=functools.partial(periodic_fid, extractor=fid_extractor, batch_size=4))
    trainer.close()
    with open(trainer.run_dir / "fid.csv") as f:
        fid = float(next(csv.DictReader(f))["fid"])
    acc = events(trainer.run_dir)
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(2, np.float32(fid))]
    [image] = acc.Images("eval/samples")
    side = image.width // 4  # four square samples in one row under a 14-pixel caption line
    assert image.step == 2 and side > 0
    assert (image.width, image.height) == labelled_grid(np.zeros((4, side, side, 3), np.uint8), [0, 1, 2, 3]).size


def test_wandb_missing_is_one_line_naming_pip(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    config = tiny_config(tmp_path, log_with="wandb")
    with pytest.raises(UserError, match="train.log_with 'wandb' needs the wandb package: pip install wandb"):
        Trainer(config, *synthetic_tokens())
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path):
    first = tracking.wandb_run_id(tmp_path)
    assert (tmp_path / tracking.WANDB_ID_FILE).read_text() == first + "\n" and len(first) == 8
    assert tracking.wandb_run_id(tmp_path) == first  # a resume continues the same W&B run


def test_log_with_is_validated(tmp_path):
    config = tiny_config(tmp_path, log_with="mlflow")
    with pytest.raises(BadInput, match="train.log_with"):
        check_config(config)
