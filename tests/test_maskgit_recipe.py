"""MaskGIT's pretraining recipe (configs/maskgit.py): the cosine masking law with its minimum rate, the loss on
masked places averaged per sample with label smoothing, AdamW (0.9, 0.96) with weight decay 0.045 and 5000 warm-up
steps, run by train_graph.py; AutoNAT's objective unchanged."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from libs.config import load_config_file
from libs.models.maskgit import MaskGIT, MaskGITConfig
from libs.training.objective import (MaskedBatch, make_masked_batch, masked_token_loss, masking_options, random_mask,
                                     sample_beta)
from tests.helpers import write_training_token_dir

B, L, K = 24, 16, 32


def oracle_counts(u, seq_len, min_rate):
    """Masked places per sample: round(L * max(clip(cos(pi/2 u), 1e-6, 1), min_rate)), at least 1, in float64."""
    return [min(seq_len, max(1, round(seq_len * max(min(max(math.cos(math.pi / 2 * x), 1e-6), 1.0), min_rate))))
            for x in u.tolist()]


@pytest.mark.parametrize("min_rate", [0.5, 0.0])
def test_cosine_masks_follow_the_schedule_with_the_minimum_rate(min_rate):
    n, seq_len = 3000, 256
    mask = random_mask(n, seq_len, generator=torch.Generator().manual_seed(3), schedule="cosine", min_rate=min_rate)
    g = torch.Generator().manual_seed(3)  # the same draws: u [n], then the scores that pick the places
    u, scores = torch.rand(n, generator=g), torch.rand(n, seq_len, generator=g)
    counts = oracle_counts(u, seq_len, min_rate)
    assert mask.sum(1).tolist() == counts
    rank = scores.argsort(1).argsort(1)  # the places: the counts[i] lowest scores of row i
    assert torch.equal(mask, rank < torch.tensor(counts)[:, None])
    at_floor = sum(c == seq_len // 2 for c in counts) / n
    if min_rate:  # u >= 2/3 (cos <= 1/2) is clipped to half the places: a third of the samples
        assert min(counts) == seq_len // 2 and abs(at_floor - 1 / 3) < 0.03
    else:
        assert min(counts) < seq_len // 4 and at_floor < 0.01


def old_beta_batch(ids, class_ids, mask_token_id, null_class_id, p_uncond, beta, generator):
    """AutoNAT's masked batch as the objective made it before the cosine schedule existed (its code, inline)."""
    r = sample_beta(ids.shape[0], beta[0], beta[1], generator)
    n_mask = torch.round(ids.shape[1] * r).long().clamp(1, ids.shape[1])
    rank = torch.rand(ids.shape, generator=generator).argsort(1).argsort(1)
    mask = rank < n_mask[:, None]
    drop = torch.rand(class_ids.shape, generator=generator) < p_uncond
    return (torch.where(mask, torch.full_like(ids, mask_token_id), ids),
            torch.where(drop, torch.full_like(class_ids, null_class_id), class_ids), mask)


def test_autonat_objective_is_unchanged():
    from configs import autonat_l, tiny
    for config in (autonat_l.get_config(), tiny.get_config()):
        assert masking_options(config.train) == {"schedule": "beta", "min_rate": 0.0, "average": "tokens"}
    ids, cls = torch.randint(0, K, (B, L)), torch.randint(0, 4, (B,))
    new = make_masked_batch(ids, cls, K, 4, 0.15, (12, 3), torch.Generator().manual_seed(5),
                            **masking_options(tiny.get_config().train))
    old = old_beta_batch(ids, cls, K, 4, 0.15, (12, 3), torch.Generator().manual_seed(5))
    assert torch.equal(new.input_ids, old[0]) and torch.equal(new.class_ids, old[1]) and torch.equal(new.mask, old[2])
    logits = torch.randn(B, L, K)
    ignored = torch.where(new.mask, ids, torch.full_like(ids, -100))  # the loss's code before, inline
    assert torch.equal(masked_token_loss(logits, new, 0.1),
                       F.cross_entropy(logits.flatten(0, 1), ignored.flatten(), ignore_index=-100, label_smoothing=0.1))


def cosine_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (B, L), generator=g)
    batch = make_masked_batch(ids, torch.randint(0, 4, (B,), generator=g), K, 4, 0.0, generator=g,
                              schedule="cosine", min_rate=0.5, average="samples")
    return batch, torch.randn(B, L, K, generator=g)


def test_maskgit_loss_is_the_per_sample_mean_with_torch_label_smoothing():
    batch, logits = cosine_batch()
    assert len(set(batch.mask.sum(1).tolist())) > 1  # the two averages differ on these masks
    loss = masked_token_loss(logits, batch, 0.1)
    reference = torch.stack([F.cross_entropy(logits[i][batch.mask[i]], batch.targets[i][batch.mask[i]],
                                             label_smoothing=0.1) for i in range(B)]).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    # the release's smoothing: target 1 - s + s/K on the true code, s/K elsewhere; per-sample weighted mean
    soft = F.one_hot(batch.targets, K).float() * 0.9 + 0.1 / K  # [B,L,K]
    per_place = -(soft * logits.log_softmax(-1)).sum(-1)  # [B,L]
    weights = batch.mask.float()
    official = ((per_place * weights).sum(1) / weights.sum(1)).mean()
    torch.testing.assert_close(loss, official, rtol=1e-6, atol=1e-6)
    tokens = masked_token_loss(logits, MaskedBatch(batch.input_ids, batch.class_ids, batch.targets, batch.mask), 0.1)
    assert abs(float(tokens - loss)) > 1e-4
    changed = logits.clone()
    changed[~batch.mask] = torch.randn_like(changed[~batch.mask])  # unmasked places do not count
    assert torch.equal(masked_token_loss(changed, batch, 0.1), loss)


def test_unknown_schedule_or_average_is_refused():
    ids, cls = torch.zeros(2, L, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown mask schedule 'linear'"):
        make_masked_batch(ids, cls, K, 4, schedule="linear")
    with pytest.raises(ValueError, match="unknown loss average 'pixels'"):
        make_masked_batch(ids, cls, K, 4, average="pixels")


def test_the_maskgit_configs_carry_the_recipe():
    for path in ("configs/maskgit.py", "configs/ka_maskgit.py", "configs/tiny_maskgit.py"):
        t = load_config_file(path).train
        assert masking_options(t) == {"schedule": "cosine", "min_rate": 0.5, "average": "samples"}, path
        assert t.label_smoothing == 0.1 and t.p_uncond == 0.0, path
    t = load_config_file("configs/tiny_maskgit.py").train
    assert (tuple(t.betas), t.weight_decay, t.warmup_steps, t.lr) == ((0.9, 0.96), 0.045, 5000, 1e-4)


def test_tiny_maskgit_pretrains_with_the_recipe_through_train_graph(tmp_path):
    import train_graph
    data = write_training_token_dir(tmp_path / "tokens")
    assert train_graph.main(["--config", "configs/tiny_maskgit.py", f"--config.data.path={data}",
                             f"--config.output_dir={tmp_path / 'runs'}", "--config.train.n_steps=3",
                             "--config.train.batch_size=8", "--config.train.log_interval=1",
                             "--config.train.save_interval=3"]) == 0
    run = tmp_path / "runs" / "tiny_maskgit"
    config = json.loads((run / "config.json").read_text())
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        step = int(r["step"])
        assert float(r["lr"]) == pytest.approx(1e-4 * step / 5000, rel=1e-12)  # linear warm-up over 5000 steps
        assert math.isfinite(float(r["loss"]))
        # the step's generator (seed, rank 0, step) draws u first: the masked ratio of the schedule, exactly
        u = torch.rand(8, generator=torch.Generator().manual_seed(config["seed"] * 1_000_003 + step - 1))
        assert float(r["masked_ratio"]) == pytest.approx(sum(oracle_counts(u, L, 0.5)) / (8 * L), abs=1e-12)
    state = torch.load(run / "checkpoints" / "step_0000003.pt", weights_only=True)
    decay, no_decay = state["optimizer"]["param_groups"]
    assert tuple(decay["betas"]) == (0.9, 0.96) and decay["weight_decay"] == 0.045
    assert no_decay["weight_decay"] == 0.0
    model = MaskGIT(MaskGITConfig(**config["model"]))
    assert len(state["trained_params"]) == len(list(model.parameters()))  # the whole backbone trains
    model.load_state_dict(load_file(run / "model_ema.safetensors"), strict=True)
