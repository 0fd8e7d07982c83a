"""Strategy search: parametrisation and constraints, the seeded evolution strategy, log replay and resume, the
written strategy file (--strategy), held-out evaluation; end to end with the tiny model."""
import json
import math

import numpy as np
import pytest

from configs import autonat_t8_strategy
from libs.errors import BadInput
from libs.sampling import strategy_search as ss
from libs.sampling.decoding import maskgit_schedule, schedule_from_config
from libs.sampling.generation import load_strategy_file, schedule_from_flags
from tests.helpers import write_reference_stats

PUBLISHED = schedule_from_config(autonat_t8_strategy.get_config())


def check_valid(strategy, T):
    r = strategy["ratios"]
    assert len(r) == T - 1 and len(strategy["conf_temps"]) == T - 1
    assert len(strategy["sample_temps"]) == T and len(strategy["guidance"]) == T
    assert all(0 < v < 1 for v in r) and all(b < a for a, b in zip(r, r[1:]))
    assert all(0 < v < math.inf for v in strategy["conf_temps"] + strategy["sample_temps"])
    assert all(0 <= g < math.inf for g in strategy["guidance"])
    ss.strategy_schedule(strategy)  # a Schedule the decoder accepts


@pytest.mark.parametrize("T", [1, 2, 8, 12])
def test_every_vector_decodes_to_a_valid_strategy(T):
    assert ss.num_params(T) == 4 * T - 2
    rng = np.random.default_rng(T)
    for scale in (0.1, 3.0, 100.0):
        for _ in range(20):
            check_valid(ss.decode(rng.normal(0, scale, ss.num_params(T)), T), T)
    with pytest.raises(ValueError, match="numbers"):
        ss.decode(np.zeros(ss.num_params(T) + 1), T)


@pytest.mark.parametrize("schedule", [PUBLISHED, maskgit_schedule(8, 3.0), maskgit_schedule(5, 2.0, 4.5)])
def test_encode_decode_round_trip(schedule):
    back = ss.decode(ss.encode(schedule), schedule.steps)
    for key in ss.RATIO_KEYS:
        np.testing.assert_allclose(back[key], getattr(schedule, key), rtol=1e-12, atol=1e-12)


def test_encode_refuses_strategies_outside_the_constraints():
    with pytest.raises(BadInput, match="decreasing ratios"):
        ss.encode(schedule_from_config(dict_config(ratios=[0.5, 0.6] + PUBLISHED.ratios[2:])))
    with pytest.raises(BadInput, match="positive temperatures"):
        ss.encode(schedule_from_config(dict_config(sample_temps=[0.0] + PUBLISHED.sample_temps[1:])))


def dict_config(**kw):
    cfg = autonat_t8_strategy.get_config()
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ----------------------------------------------------------------------------- the evolution strategy


def sphere(target):
    def f(vector, strategy, iteration):
        return float(np.sum((np.asarray(vector) - target) ** 2))
    return f


def test_evolution_strategy_is_seeded_and_improves():
    x0 = np.zeros(ss.num_params(4))
    target = np.linspace(-1, 1, len(x0))
    settings = ss.SearchSettings(iterations=30, offspring=4, sigma=0.3, seed=1)
    a = ss.evolution_strategy(x0, sphere(target), settings)
    b = ss.evolution_strategy(x0, sphere(target), settings)
    assert a["objective"] == b["objective"] and np.array_equal(a["x"], b["x"])
    assert a["evaluations"] == 1 + 30 * 4
    assert a["objective"] < 0.5 * float(np.sum(target ** 2))
    c = ss.evolution_strategy(x0, sphere(target), ss.SearchSettings(iterations=30, offspring=4, sigma=0.3, seed=2))
    assert not np.array_equal(a["x"], c["x"])
    check_valid(a["strategy"], 4)


def test_logged_objective_replays_and_continues():
    x0 = np.zeros(ss.num_params(3))
    f = sphere(np.ones(len(x0)))
    calls = []

    def compute_for(strategy):  # the objective computed from the strategy alone, as the real one is
        x = ss.encode(ss.strategy_schedule(strategy))
        calls.append(1)
        return f(x, strategy, 0)

    short = ss.LoggedObjective([], compute_for)
    ss.evolution_strategy(x0, short, ss.SearchSettings(iterations=2, offspring=3, seed=0))
    assert len(calls) == 7 and len(short.entries) == 7
    calls.clear()
    longer = ss.LoggedObjective(short.entries, compute_for)
    resumed = ss.evolution_strategy(x0, longer, ss.SearchSettings(iterations=4, offspring=3, seed=0))
    assert len(calls) == 6  # only the two new generations were computed
    direct = ss.evolution_strategy(x0, ss.LoggedObjective([], compute_for),
                                   ss.SearchSettings(iterations=4, offspring=3, seed=0))
    assert resumed["objective"] == direct["objective"] and np.array_equal(resumed["x"], direct["x"])
    tampered = [dict(e) for e in short.entries]
    tampered[3]["vector"] = [v + 1e-9 for v in tampered[3]["vector"]]
    with pytest.raises(BadInput, match="entry 3 holds another candidate"):
        ss.evolution_strategy(x0, ss.LoggedObjective(tampered, compute_for),
                              ss.SearchSettings(iterations=2, offspring=3, seed=0))


def test_summary_compares_heldout_seeds_paired():
    found = {"evaluations": 9, "sigma": 0.1, "strategy": {"a": 1}, "start": {"a": 0}}
    args = type("A", (), {"num": 100, "sample_seed": 0})()
    seeds = [1000, 1001, 1002]
    beats = ss.summarise(50.0, 40.0, {"start": [50.0, 52.0, 54.0], "best": [45.0, 47.1, 48.9]}, seeds, found, args,
                         1.0, 1.0, 1)
    assert beats["heldout"]["paired_difference_mean"] == pytest.approx(-5.0)
    assert beats["heldout"]["start_std"] == pytest.approx(2.0) and "beyond the seed-to-seed spread" in beats["verdict"]
    within = ss.summarise(50.0, 40.0, {"start": [50.0, 52.0, 54.0], "best": [49.0, 54.0, 52.0]}, seeds, found, args,
                          1.0, 1.0, 1)
    assert "within the seed-to-seed spread" in within["verdict"]
    worse = ss.summarise(50.0, 40.0, {"start": [50.0, 52.0, 54.0], "best": [51.0, 53.0, 55.0]}, seeds, found, args,
                         1.0, 1.0, 1)
    assert "does not beat the start" in worse["verdict"]
    same = ss.summarise(50.0, 50.0, {"start": [50.0] * 3, "best": [50.0] * 3}, seeds, {**found, "strategy": {"a": 0}},
                        args, 1.0, 1.0, 1)
    assert "nothing better than the start" in same["verdict"]


def test_strategy_file_round_trips(tmp_path):
    strategy = ss.decode(np.random.default_rng(0).normal(size=ss.num_params(8)), 8)
    path = tmp_path / "s.py"
    ss.write_strategy_file(path, strategy, "a test strategy")
    assert load_strategy_file(path) == strategy  # exact floats
    from libs.config import load_config_file
    cfg = load_config_file("configs/tiny.py")
    sched = schedule_from_flags(cfg, strategy=str(path))
    assert [sched.ratios, sched.conf_temps, sched.sample_temps, sched.guidance] == [
        strategy[k] for k in ss.RATIO_KEYS]
    assert cfg.sample.pixels == "truncate"  # a strategy never touches the pixel quantisation


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def search(tiny_assets, tmp_path, use_fid_extractor, monkeypatch):
    """(run(out, *extra) -> result, count of objective calls) with the tiny model and an 8-image reference."""
    root, overrides = tiny_assets
    monkeypatch.setattr(ss, "load_feature_extractor", lambda *a, **k: use_fid_extractor)
    ref = write_reference_stats(tmp_path / "ref.npz", use_fid_extractor)
    calls = []
    real = ss.FIDObjective.__call__
    monkeypatch.setattr(ss.FIDObjective, "__call__", lambda self, s, seed: calls.append(seed) or real(self, s, seed))

    def run(out, *extra):
        return ss.main(["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "2", "--batch-size", "2",
                        "--iterations", "2", "--offspring", "1", "--sigma", "0.5", "--heldout-seeds", "1",
                        "--ref-stats", str(ref), "--device", "cpu", "--out", str(out), *overrides, *extra])
    return run, calls, root, overrides


def test_search_log_resume_and_heldout(search, tmp_path):
    run, calls, root, overrides = search
    full = run(tmp_path / "full")
    n_evals = 1 + 2 * 1
    assert full["search"]["evaluations"] == n_evals
    heldout_calls = len(calls) - n_evals
    assert heldout_calls in (1, 2)  # start and best on 1 seed (once when the best is the start)
    assert set(calls[n_evals:]) == {1000} and set(calls[:n_evals]) == {0}
    log = (tmp_path / "full" / ss.LOG_FILE).read_text().splitlines()
    settings = json.loads(log[0])["settings"]
    assert settings["steps"] == 8 and settings["start"]["schedule"] == "autonat"
    assert settings["start"]["ratios"] == list(autonat_t8_strategy.get_config().ratios)  # T=8: the published one
    evals = [json.loads(line) for line in log[1:] if json.loads(line)["type"] == "eval"]
    assert [e["eval"] for e in evals] == list(range(n_evals))
    assert min(e["objective"] for e in evals) == full["search"]["best_fid"] <= evals[0]["objective"]
    for e in evals[1:]:
        check_valid(e["strategy"], 8)
    assert full["heldout"]["seeds"] == [1000] and len(full["heldout"]["best_fid"]) == 1
    assert full["heldout"]["start_fid"] != [full["search"]["start_fid"]]  # a fresh seed, other samples
    # an interrupted run continued by a rerun ends exactly like the uninterrupted one
    calls.clear()
    with pytest.raises(SystemExit):
        run(tmp_path / "resumed", "--stop-after-evals", "2")
    assert len(calls) == 2 and len((tmp_path / "resumed" / ss.LOG_FILE).read_text().splitlines()) == 3
    calls.clear()
    resumed = run(tmp_path / "resumed")
    assert len(calls) == n_evals - 2 + heldout_calls  # the logged evaluations were not redone
    for name in (ss.LOG_FILE, ss.BEST_FILE, ss.START_FILE):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert resumed["search"] == full["search"] and resumed["heldout"] == full["heldout"]
    # a finished search reruns without evaluating anything; other settings are refused
    calls.clear()
    assert run(tmp_path / "full")["heldout"] == full["heldout"] and not calls
    with pytest.raises(BadInput, match="other settings .*search.sigma: 0.5 -> 0.25"):
        run(tmp_path / "full", "--sigma", "0.25")
    assert not calls
    longer = run(tmp_path / "full", "--iterations", "3")  # more generations continue the same search
    assert longer["search"]["evaluations"] == n_evals + 1
    assert (tmp_path / "full" / ss.LOG_FILE).read_text().splitlines()[:n_evals + 1] == log[:n_evals + 1]
    # the best strategy file drives generate_img.py --strategy
    import generate_img
    best = load_strategy_file(tmp_path / "full" / ss.BEST_FILE)
    assert best == longer["best_strategy"]
    run_dir = generate_img.main(["--checkpoint", str(root / "ka_mig.pth"), "--classes", "1", "--per-class", "1",
                                 "--strategy", str(tmp_path / "full" / ss.BEST_FILE), "--out", str(tmp_path / "img"),
                                 "--device", "cpu", *overrides])
    fp = json.loads((run_dir / "fingerprint.json").read_text())
    assert [fp["fingerprint"]["schedule"][k] for k in ss.RATIO_KEYS] == [best[k] for k in ss.RATIO_KEYS]
    assert fp["files"]["strategy"].endswith(ss.BEST_FILE)


def test_search_input_errors(search, tmp_path):
    run, calls, _, _ = search
    with pytest.raises(BadInput, match="held-out seeds"):
        run(tmp_path / "x", "--heldout-seed-base", "0")
    with pytest.raises(BadInput, match="has 8 steps, --steps asks for 5"):
        run(tmp_path / "x", "--strategy", "configs/autonat_t8_strategy.py", "--steps", "5")
    with pytest.raises(BadInput, match="--offspring must be at least 1"):
        run(tmp_path / "x", "--offspring", "0")
    assert not calls and not (tmp_path / "x").exists()


def test_generate_npz_takes_a_strategy_file(tiny_assets, tmp_path):
    import generate_npz
    root, overrides = tiny_assets
    strategy = ss.decode(np.random.default_rng(3).normal(size=ss.num_params(4)), 4)
    ss.write_strategy_file(tmp_path / "s.py", strategy, "a 4-step strategy")
    generate_npz.main(["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "2", "--batch-size", "2",
                       "--no-fid", "--device", "cpu", "--strategy", str(tmp_path / "s.py"),
                       "--out", str(tmp_path / "npz"), *overrides])
    fp = json.loads((tmp_path / "npz" / "fingerprint.json").read_text())["fingerprint"]["schedule"]
    assert fp["name"] == "autonat" and [fp[k] for k in ss.RATIO_KEYS] == [strategy[k] for k in ss.RATIO_KEYS]
    assert np.load(tmp_path / "npz" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)


def test_search_help_describes_its_own_seed_steps_and_overwrite():
    """The search reuses the sampling flags but gives --seed, --steps and --overwrite its own meaning."""
    import argparse

    from libs.sampling.generation import add_sampling_flags
    helps = {a.dest: a.help for a in ss.build_parser()._actions}
    assert "search" in helps["seed"] and "--sample-seed" in helps["seed"]
    assert "search log" in helps["overwrite"] and "fingerprint" not in helps["overwrite"]
    assert "searched strategy" in helps["steps"]
    plain = argparse.ArgumentParser()
    add_sampling_flags(plain)
    plain_helps = {a.dest: a.help for a in plain._actions}
    assert "fingerprint" in plain_helps["overwrite"] and "(seed, i)" in plain_helps["seed"]
