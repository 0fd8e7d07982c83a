"""Guidance schedules (constant / linear / pow-cosine), guidance steps, batched guidance, the Halton order."""
import json
import math

import pytest
import torch

from configs import autonat_t8_strategy
from libs.config import load_config_file
from libs.errors import BadInput
from libs.models.factory import for_sampling
from libs.sampling import decoding
from libs.sampling.decoding import (generate, guidance_values, guided_logits, halton_order, maskgit_schedule,
                                    parse_guidance_steps, remask_count, schedule_from_config)
from libs.sampling.generation import schedule_from_flags
from libs.sampling.provenance import schedule_record
from tests.helpers import randomise_fusion, tiny_backbone, tiny_ka_mig


def test_constant_and_linear_guidance():
    assert guidance_values("constant", 2.5, 4) == [2.5] * 4
    assert guidance_values("linear", 3.0, 4) == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-15)
    assert guidance_values("linear", 3.0, 7) == torch.linspace(0, 3.0, 7, dtype=torch.float64).tolist()
    assert guidance_values("linear", 3.0, 1) == [0.0]
    assert maskgit_schedule(5, 2.0).guidance == guidance_values("linear", 2.0, 5)  # the default is unchanged


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, 3.0])
def test_pow_cosine_guidance_follows_its_formula(power):
    T, s = 6, 4.0
    got = guidance_values("pow-cosine", s, T, power)
    want = [s * (1 - math.cos(math.pi * (t / (T - 1)) ** power)) / 2 for t in range(T)]
    assert got == pytest.approx(want, abs=1e-12, rel=0)
    assert got[0] == 0.0 and got[-1] == pytest.approx(s, abs=1e-12)
    assert all(a <= b for a, b in zip(got, got[1:]))  # non-decreasing ramp
    if power == 1.0:  # a half cosine: the middle step is exactly half way
        assert guidance_values("pow-cosine", s, 5, power)[2] == pytest.approx(s / 2, abs=1e-12)
    assert guidance_values("pow-cosine", s, 1, power) == [0.0]


def test_pow_cosine_values_by_hand():
    # T = 3, power 2: t/(T-1) = 0, 1/2, 1 -> (1 - cos(pi/4)) / 2 = 0.1464466 at the middle step
    assert guidance_values("pow-cosine", 2.0, 3, 2.0) == pytest.approx([0.0, 2 * 0.14644660940672624, 2.0])


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="guidance_power must be positive"):
        guidance_values("pow-cosine", 1.0, 4, 0.0)
    with pytest.raises(ValueError, match="unknown guidance_schedule"):
        guidance_values("cosine", 1.0, 4)


def sample_config(**kw):
    cfg = autonat_t8_strategy.get_config()
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_schedule_from_config_uses_the_guidance_keys():
    cfg = sample_config(schedule="maskgit", steps=5, cfg_scale=2.0, guidance_schedule="pow-cosine", guidance_power=2.0)
    assert schedule_from_config(cfg).guidance == guidance_values("pow-cosine", 2.0, 5, 2.0)
    cfg.guidance_schedule = "constant"
    assert schedule_from_config(cfg).guidance == [2.0] * 5
    cfg.guidance_steps = "3-4"  # guidance only at the last two steps
    assert schedule_from_config(cfg).guidance == [0.0, 0.0, 0.0, 2.0, 2.0]
    # the autonat strategy keeps its own list; guidance_steps still switches steps off
    auto = sample_config(guidance_schedule="constant", guidance_steps="0,7")
    strategy = autonat_t8_strategy.get_config().guidance
    assert schedule_from_config(auto).guidance == [strategy[0]] + [0.0] * 6 + [strategy[7]]


def test_guidance_steps_parsing():
    assert parse_guidance_steps("all", 8) is None and parse_guidance_steps(None, 8) is None
    assert parse_guidance_steps("4-7", 8) == [4, 5, 6, 7]
    assert parse_guidance_steps("[0, 2,5]", 8) == [0, 2, 5]
    assert parse_guidance_steps("1,3-4,1", 8) == [1, 3, 4]
    assert parse_guidance_steps([7, 0], 8) == [0, 7]
    for bad, match in (("8", "outside"), ("x", "not a step"), ("", "lists no step"), ("2-", "not a step")):
        with pytest.raises(ValueError, match=match):
            parse_guidance_steps(bad, 8)


def test_schedule_flags_and_their_errors():
    cfg = load_config_file("configs/tiny.py")
    sched = schedule_from_flags(cfg, "maskgit", 4, 3.0, None, guidance_schedule="pow-cosine", guidance_power=3.0)
    assert sched.guidance == guidance_values("pow-cosine", 3.0, 4, 3.0)
    assert cfg.sample.guidance_schedule == "pow-cosine"  # the config describes what is sampled
    with pytest.raises(BadInput, match="autonat strategy keeps its per-step guidance"):
        schedule_from_flags(load_config_file("configs/tiny.py"), None, guidance_schedule="constant")
    with pytest.raises(BadInput, match="guidance_steps"):
        schedule_from_flags(load_config_file("configs/tiny.py"), None, guidance_steps="9")
    with pytest.raises(BadInput, match=r"config.sample.guidance_power=-1.0 \(from --guidance-power; allowed: a finite"):
        schedule_from_flags(load_config_file("configs/tiny.py"), "maskgit", guidance_schedule="pow-cosine",
                            guidance_power=-1.0)


def test_generate_uses_the_guidance_of_each_step(monkeypatch):
    seen = []
    real = decoding.guided_logits
    monkeypatch.setattr(decoding, "guided_logits", lambda m, i, c, s, n: seen.append(s) or real(m, i, c, s, n))
    sched = schedule_from_config(sample_config(schedule="maskgit", steps=5, cfg_scale=2.0,
                                               guidance_schedule="pow-cosine", guidance_power=2.0))
    generate(tiny_backbone(), torch.tensor([0, 1]), sched, seq_len=16, mask_token_id=32, null_class_id=4,
             generator=torch.Generator().manual_seed(0))
    assert seen == guidance_values("pow-cosine", 2.0, 5, 2.0)


@pytest.mark.parametrize("kind", ["autonat", "ka_mig"])
def test_batched_guidance_equals_two_calls(kind):
    if kind == "autonat":
        model = tiny_backbone()
    else:
        model, _ = tiny_ka_mig()
        randomise_fusion(model)
        model = for_sampling(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 33, (3, 16), generator=g)
    cls = torch.tensor([0, 1, 3])
    with torch.no_grad():
        cond, uncond = model(ids, cls), model(ids, torch.full_like(cls, 4))
        for scale in (0.0, 1.7, 4.0):
            batched = guided_logits(model, ids, cls, scale, null_class_id=4)
            torch.testing.assert_close(batched, cond + scale * (cond - uncond), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- Halton order


def test_halton_order_is_a_fixed_permutation():
    order = halton_order(4, 4)
    assert sorted(order) == list(range(16))
    # Halton points (base 2 -> column, base 3 -> row) i = 1..4: (1/2, 1/3) (1/4, 2/3) (3/4, 1/9) (1/8, 4/9)
    assert order[:4] == (1 * 4 + 2, 2 * 4 + 1, 0 * 4 + 3, 1 * 4 + 0)
    assert halton_order(16, 16) == halton_order(16, 16) and sorted(halton_order(16, 16)) == list(range(256))
    assert sorted(halton_order(3, 5)) == list(range(15))


@pytest.mark.parametrize("schedule", [maskgit_schedule(6, 2.0), schedule_from_config(autonat_t8_strategy.get_config())])
def test_halton_order_reveals_tokens_in_order_with_the_same_counts(schedule):
    model = tiny_backbone()
    halton = decoding.Schedule(**{**vars(schedule), "order": "halton"})
    order = halton_order(4, 4)
    kw = dict(seq_len=16, mask_token_id=32, null_class_id=4)
    record = []
    ids = generate(model, torch.tensor([0, 3]), halton, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                   record=record, **kw)
    again = generate(model, torch.tensor([0, 3]), halton, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     **kw)
    assert torch.equal(ids, again) and not torch.any(ids == 32)
    masked = 16
    for t, step in enumerate(record[:-1]):
        masked = max(1, min(masked - 1, remask_count(16, schedule.ratios[t], schedule.ratio_dtype)))
        revealed = set(order[:16 - masked])  # exactly the first positions of the order are known
        for row in step:
            assert {i for i in range(16) if row[i] != 32} == revealed, t
    confidence = generate(model, torch.tensor([0, 3]), schedule,
                          generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    assert not torch.equal(confidence, ids)


def test_schedule_record_shows_new_settings_only_when_set():
    cfg = load_config_file("configs/tiny.py")
    plain = schedule_record(cfg, schedule_from_config(cfg.sample))
    assert not {"guidance_schedule", "guidance_power", "guidance_steps", "order"} & set(plain)
    sched = schedule_from_flags(cfg, "maskgit", 4, 2.0, None, guidance_schedule="pow-cosine", guidance_power=2.0,
                                guidance_steps="1-3", order="halton")
    record = json.loads(json.dumps(schedule_record(cfg, sched)))
    assert record["guidance_schedule"] == "pow-cosine" and record["guidance_power"] == 2.0
    assert record["guidance_steps"] == "1-3" and record["order"] == "halton"
    assert record["guidance"][0] == 0.0 and record["guidance"][3] == pytest.approx(2.0)


def test_sampling_scripts_take_the_guidance_and_order_flags(tiny_assets, tmp_path):
    import generate_img
    root, overrides = tiny_assets
    run_dir = generate_img.main(["--checkpoint", str(root / "ka_mig.pth"), "--classes", "1", "--per-class", "2",
                                 "--out", str(tmp_path), "--device", "cpu", "--schedule", "maskgit", "--steps", "4",
                                 "--cfg", "2", "--guidance-schedule", "pow-cosine", "--guidance-power", "2",
                                 "--guidance-steps", "2-3", "--order", "halton", *overrides])
    fp = json.loads((run_dir / "fingerprint.json").read_text())["fingerprint"]["schedule"]
    want = guidance_values("pow-cosine", 2.0, 4, 2.0)
    assert fp["guidance"] == [0.0, 0.0, want[2], want[3]] and fp["order"] == "halton"
    assert len(list(run_dir.glob("0*.png"))) == 2
