"""Decoding (libs/sampling/decoding.py) and the training objective (libs/training/objective.py): masking law,
masked loss, schedules, determinism, batched guidance."""
import json
import math

import numpy as np
import pytest
import torch

from configs import autonat_t8_strategy
from libs.sampling.decoding import (Schedule, generate, guided_logits, maskgit_schedule, remask_count,
                                    schedule_from_config)
from libs.training.objective import make_masked_batch, masked_token_loss, random_mask
from tests.helpers import tiny_backbone


def test_training_masks_follow_beta_12_3():
    g = torch.Generator().manual_seed(0)
    mask = random_mask(10_000, 256, (12, 3), generator=g)
    frac = mask.float().mean(1)
    assert abs(float(frac.mean()) - 0.8) < 0.02
    assert abs(float(frac.std()) - math.sqrt(12 * 3 / (15 ** 2 * 16))) < 0.01  # Beta(12,3) std
    assert int(mask.sum(1).min()) >= 1


def test_at_least_one_masked_token_on_short_sequences():
    mask = random_mask(5000, 2, (1, 30), generator=torch.Generator().manual_seed(1))
    assert int(mask.sum(1).min()) == 1


def test_masked_batch_and_loss_only_on_masked_places():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (64, 16))
    cls = torch.randint(0, 4, (64,))
    batch = make_masked_batch(ids, cls, 32, 4, p_uncond=0.5, generator=g)
    assert torch.all(batch.input_ids[batch.mask] == 32)
    assert torch.equal(batch.input_ids[~batch.mask], ids[~batch.mask])
    dropped = (batch.class_ids == 4).float().mean()
    assert 0.3 < float(dropped) < 0.7
    assert torch.all((batch.class_ids == 4) | (batch.class_ids == cls))
    logits = torch.randn(64, 16, 32)
    changed = logits.clone()
    changed[~batch.mask] = torch.randn_like(changed[~batch.mask])  # unmasked places do not count
    assert torch.equal(masked_token_loss(logits, batch), masked_token_loss(changed, batch))


def test_schedules():
    s = schedule_from_config(autonat_t8_strategy.get_config())
    assert s.steps == 8 and len(s.ratios) == 7
    m = maskgit_schedule(4, 2.0, temp=4.5)
    assert m.guidance[0] == 0.0 and m.guidance[-1] == 2.0
    assert m.ratios[0] == pytest.approx(math.cos(math.pi / 8))
    with pytest.raises(ValueError):
        Schedule([0.5], [1.0], [1.0], [1.0, 1.0, 1.0])


def float32_maskgit_counts(T, seq_len=256):
    """Re-mask counts of the reference arithmetic, computed here with numpy float32 (cos correctly rounded)."""
    counts = []
    for t in range(T - 1):
        angle = np.float32(np.pi / 2) * np.float32((t + 1) / T)  # float32 product
        ratio = np.float32(math.cos(float(angle)))  # cosine of the float32 angle, rounded to float32
        counts.append(int(np.floor(np.float32(seq_len) * ratio)))  # float32 product, then floor
    return counts


@pytest.mark.parametrize("T", [3, 6, 9, 12])
def test_maskgit_counts_follow_the_float32_reference(T):
    sched = maskgit_schedule(T, 2.0)
    expected = float32_maskgit_counts(T)
    assert expected[2 * T // 3 - 1] == 127  # ratio 2/3: floor(256 * 0.49999997); float64 would give 128
    assert math.floor(256 * math.cos(math.pi / 2 * 2 / 3)) == 128
    assert all(float(np.float32(r)) == r for r in sched.ratios)  # float32 values
    assert json.loads(json.dumps(vars(sched)))["ratio_dtype"] == "float32"  # scripts store vars(schedule)
    record = []
    model = tiny_backbone(seq_len=256)
    generate(model, torch.tensor([1]), sched, seq_len=256, mask_token_id=32, null_class_id=4,
             generator=torch.Generator().manual_seed(0), record=record)
    got = [int((ids == 32).sum()) for ids in record[:-1]]  # masked tokens left after each step
    n_masked, want = 256, []
    for c in expected:  # the count is also capped to leave progress: max(1, min(#masked - 1, c))
        n_masked = max(1, min(n_masked - 1, c))
        want.append(n_masked)
    assert got == want


def test_maskgit_single_step_guidance_is_zero():
    sched = maskgit_schedule(1, 3.0)
    assert sched.guidance == [0.0] == torch.linspace(0, 3.0, 1).tolist()
    assert sched.ratios == [] and sched.conf_temps == [] and sched.sample_temps == [1.0]
    ids = generate(tiny_backbone(), torch.tensor([0, 2]), sched, seq_len=16, mask_token_id=32, null_class_id=4,
                   generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16) and not torch.any(ids == 32)


def test_autonat_counts_stay_float64():
    sched = schedule_from_config(autonat_t8_strategy.get_config())
    assert sched.ratio_dtype == "float64"
    assert [remask_count(256, r, sched.ratio_dtype) for r in sched.ratios] == [
        math.floor(256 * r) for r in sched.ratios] == [244, 225, 203, 190, 159, 104, 66]


def sample(model, schedule, seed, record=None):
    g = torch.Generator().manual_seed(seed)
    return generate(model, torch.tensor([0, 1, 2, 3]), schedule, seq_len=16, mask_token_id=32,
                    null_class_id=4, generator=g, record=record)


@pytest.mark.parametrize("schedule", [schedule_from_config(autonat_t8_strategy.get_config()),
                                      maskgit_schedule(6, 3.0)])
def test_mask_count_follows_schedule_and_output_is_valid(schedule):
    model = tiny_backbone()
    record = []
    ids = sample(model, schedule, seed=0, record=record)
    n_masked = 16
    for t, step_ids in enumerate(record[:-1]):
        expected = max(1, min(n_masked - 1, remask_count(16, schedule.ratios[t], schedule.ratio_dtype)))
        assert torch.all((step_ids == 32).sum(1) == expected)
        n_masked = expected
    assert not torch.any(ids == 32)
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    assert torch.equal(ids, sample(model, schedule, seed=0))
    assert not torch.equal(ids, sample(model, schedule, seed=1))


def test_known_tokens_are_never_changed():
    model = tiny_backbone()
    record = []
    sample(model, maskgit_schedule(5, 1.0), seed=3, record=record)
    for prev, nxt in zip(record, record[1:]):
        known = prev != 32
        assert torch.equal(nxt[known], prev[known])


def test_batched_guidance_equals_two_calls():
    model = tiny_backbone()
    ids = torch.randint(0, 33, (3, 16))
    cls = torch.tensor([0, 1, 3])
    batched = guided_logits(model, ids, cls, 1.7, null_class_id=4)
    cond, uncond = model(ids, cls), model(ids, torch.full_like(cls, 4))
    torch.testing.assert_close(batched, cond + 1.7 * (cond - uncond), atol=1e-5, rtol=0)


def test_per_sample_generators_make_samples_independent_of_batch_mates():
    model = tiny_backbone()
    sched = maskgit_schedule(4, 1.0)
    kw = dict(seq_len=16, mask_token_id=32, null_class_id=4)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = generate(model, torch.tensor([1, 2]), sched, generator=gens([10, 11]), **kw)
    alone = generate(model, torch.tensor([2]), sched, generator=gens([11]), **kw)
    assert torch.equal(both[1], alone[0])


def test_gumbel_max_sampling_matches_softmax():
    from libs.sampling.decoding import gumbel
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = (logits + gumbel((50_000, 4), g, "cpu")).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / 50_000
    torch.testing.assert_close(freq, torch.softmax(logits, 0), atol=0.01, rtol=0)


@pytest.mark.parametrize("switches", [dict(use_incompat=False), dict(use_co=False, use_sim=False, use_incompat=False)])
def test_sampling_cache_without_g_p_decodes_like_the_model(switches):
    """A KA-MIG with G_p off (e.g. the head-only control) samples through its FusionCache: the decoder's class
    preparation is skipped (there are no class terms) and the ids equal decoding with the model itself."""
    from libs.models.factory import for_sampling
    from libs.models.ka_mig import KAMIG, GraphConfig
    from tests.helpers import randomise_fusion, tiny_backbone, tiny_graphs
    backbone = tiny_backbone()
    model = KAMIG(backbone.cfg, GraphConfig(**switches), tiny_graphs()).eval()
    model.load_state_dict(backbone.state_dict(), strict=False)
    randomise_fusion(model)
    cls = torch.tensor([0, 1, 4])
    schedule = maskgit_schedule(4, 2.0)  # with guidance: the null class joins the batch
    kw = dict(seq_len=16, mask_token_id=32, null_class_id=4)
    with torch.no_grad():
        cached = generate(for_sampling(model), cls, schedule, generator=torch.Generator().manual_seed(0), **kw)
        plain = generate(model, cls, schedule, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(cached, plain)
