"""Periodic FID during training: samples with the current EMA weights, logs, never touches checkpoints."""
import copy
import time
from pathlib import Path

import numpy as np
import torch

from libs.evaluation.fid_stats import compute_metrics, load_reference_stats
from libs.checkpoint import require_file
from libs.errors import BadInput
from libs.evaluation.inception import FEATURE_DIM, load_feature_extractor
from libs.models.factory import backbone_config, check_tokenizer_matches, for_sampling, tokenizer_config
from libs.models.factory import load_tokenizer
from libs.sampling.decoding import schedule_from_config
from libs.sampling.generation import class_labels, index_generators, labelled_grid, sample_images
from libs.training.tracking import log_evaluation
from libs.training.trainer import append_csv

GRID_IMAGES = 32  # the first samples (balanced classes) in the labelled grid logged at each evaluation


def ema_model(trainer):
    """A frozen eval-mode copy of the trained model with the EMA weights swapped in."""
    model = copy.deepcopy(trainer.unwrapped).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainer.ema:
                p.copy_(trainer.ema[name].to(p.dtype))
    return model


def check_periodic_fid_inputs(config):
    """What periodic FID (train.fid_interval > 0) will read, opened and checked before the first training step:
    the tokenizer (a checkpoint is set, exists, loads strictly, and its codebook and grid are the model's) and
    train.fid_ref_stats (keys, shapes, 2048-d, finite values). Raises BadInput / MissingInput naming the file."""
    if not config.tokenizer.checkpoint:
        raise BadInput("train.fid_interval > 0 decodes samples with the tokenizer: set "
                       "--config.tokenizer.checkpoint=<file> (or --config.train.fid_interval=0)")
    tok = tokenizer_config(config.tokenizer)
    try:
        check_tokenizer_matches(tok.codebook_size, tok.grid_size, backbone_config(config.model))
    except ValueError as e:
        raise BadInput(str(e)) from e
    require_file(config.tokenizer.checkpoint)
    load_tokenizer(config.tokenizer)  # strict: another architecture is refused now, not after the first interval
    load_reference_stats(config.train.fid_ref_stats, dims=FEATURE_DIM)


def periodic_fid(trainer, batch_size=50, seed=0, extractor=None):
    """Rank 0: FID of `train.fid_samples` balanced samples vs `train.fid_ref_stats`; appended to fid.csv and
    logged to the run's tracker (FID, IS when computed, a labelled grid of the first samples)."""
    acc, t, config = trainer.accelerator, trainer.config.train, trainer.config
    if acc.is_main_process:
        start = time.time()
        device = acc.device
        model = for_sampling(ema_model(trainer))
        tokenizer = load_tokenizer(config.tokenizer, device=device)
        schedule = schedule_from_config(config.sample)
        labels = class_labels(t.fid_samples, config.model.num_classes)
        images = []
        for s in range(0, t.fid_samples, batch_size):
            idx = np.arange(s, min(s + batch_size, t.fid_samples))
            cls = torch.as_tensor(labels[idx], device=device)
            images.append(sample_images(model, tokenizer, cls, schedule, index_generators(idx, seed, device),
                                        pixels=config.sample.pixels))
        extractor = extractor or load_feature_extractor(device=device)
        ref = load_reference_stats(t.fid_ref_stats)  # mu/sigma only: FID, no precision/recall here
        images = np.concatenate(images)  # [fid_samples, H, W, 3] uint8
        result = compute_metrics(images, ref, extractor, num_expected=t.fid_samples, progress=False)
        shown = min(GRID_IMAGES, t.fid_samples)
        log_evaluation(acc, trainer.step, result, labelled_grid(images[:shown], labels[:shown]))
        row = {"step": trainer.step, "fid": result["fid"], "samples": t.fid_samples,
               "seconds": round(time.time() - start, 1)}
        append_csv(Path(trainer.run_dir) / "fid.csv", row)
        trainer.log(f"step {trainer.step}: FID {result['fid']:.3f} ({t.fid_samples} samples, EMA weights)")
        del model
    acc.wait_for_everyone()
