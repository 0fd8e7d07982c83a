"""Config values are checked before any work: every violation named in one line (key, value, what is allowed)."""
import glob
import math
from pathlib import Path

import pytest
import torch

from libs.cli import ArgumentParser, run_main
from libs.config import config_to_dict, flatten_config, load_config_file, parse_args_with_config, resolve_config
from libs.config_schema import RULES, SEED_LIMIT, TRAIN_MODES, config_violations
from libs.errors import BadInput, MissingInput
from libs.sampling.generation import (SEED_STRIDE, check_sample_seed, load_strategy_file, max_sample_seed,
                                      schedule_from_flags)

CONFIGS = sorted(p for p in glob.glob("configs/*.py") if not p.endswith("__init__.py"))
TINY = "configs/tiny.py"
STRATEGY = "configs/autonat_t8_strategy.py"  # a config.sample block on its own


def parse(*overrides, config=TINY):
    """parse_args_with_config of a bare parser with `--config config` and the overrides."""
    return parse_args_with_config(ArgumentParser(prog="test"), config, list(overrides))


def shipped_keys(path) -> set:
    """Dotted keys of a shipped config (the strategy file's keys under sample.)."""
    flat = flatten_config(config_to_dict(load_config_file(path)))
    return {f"sample.{k}" for k in flat} if path == STRATEGY else set(flat)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_validates_and_every_key_has_a_rule(path):
    config = load_config_file(path)
    found = config_violations({"sample": config}, only="sample") if path == STRATEGY else config_violations(config)
    assert found == []
    assert shipped_keys(path) - set(RULES) == set()  # a new key needs its rule in libs/config_schema.py
    if path != STRATEGY:
        assert parse(config=path)[1].to_dict() == config.to_dict()  # the entry-script path accepts it unchanged


def test_train_modes_are_the_trainers():
    from libs.training.trainer import MODE_MODEL
    assert set(TRAIN_MODES) == set(MODE_MODEL)


KA_MIG = ["--config.train.mode=ka_mig", "--config.train.init_checkpoint=x.pth"]
BAD = {  # case: (overrides, the text the one-line message must hold)
    "save_interval=0": (["--config.train.save_interval=0"], "config.train.save_interval=0 (allowed: an integer >= 1)"),
    "log_interval=0": (["--config.train.log_interval=0"], "config.train.log_interval=0 (allowed: an integer >= 1)"),
    "grad_accum=0": (["--config.train.grad_accum=0"], "config.train.grad_accum=0 (allowed: an integer >= 1)"),
    "batch_size=0": (["--config.train.batch_size=0"], "config.train.batch_size=0 (allowed: an integer >= 1)"),
    "batch not split by grad_accum": (["--config.train.grad_accum=3"],
                                      "config.train.batch_size=16 (allowed: a multiple of config.train.grad_accum"),
    "fp8": (["--config.train.mixed_precision=fp8"],
            "config.train.mixed_precision='fp8' (allowed: one of 'no', 'fp16', 'bf16')"),
    "mask_beta=(0,0)": (["--config.train.mask_beta=(0,0)"], "config.train.mask_beta[1]=0 (allowed: an integer >= 1)"),
    "mask_beta not integers": (["--config.train.mask_beta=(2.5,3)"], "config.train.mask_beta[0]=2.5"),
    "num_heads=3": (["--config.model.num_heads=3"],
                    "config.model.num_heads=3 (allowed: a divisor of config.model.embed_dim, with "
                    "config.model.embed_dim=32)"),
    "odd depth": (["--config.model.depth=3"], "config.model.depth=3 (allowed: an even integer >= 0"),
    "n_steps=None": (["--config.train.n_steps=None"], "config.train.n_steps=None (allowed: an integer >= 1)"),
    "gnn=gcnx": ([*KA_MIG, "--config.graph.gnn=gcnx"], "config.graph.gnn='gcnx' (allowed: one of 'gcn', 'gat')"),
    "ka_mig without backbone": (["--config.train.mode=ka_mig"], "config.train.init_checkpoint='' (allowed: the"),
    "p_uncond > 1": (["--config.train.p_uncond=1.5"], "config.train.p_uncond=1.5 (allowed: a finite number in [0, 1])"),
    "label_smoothing < 0": (["--config.train.label_smoothing=-0.1"], "config.train.label_smoothing=-0.1"),
    "ema_rate > 1": (["--config.train.ema_rate=2.0"], "config.train.ema_rate=2.0"),
    "dropout > 1": (["--config.model.dropout=1.5"], "config.model.dropout=1.5"),
    "beta of 1": (["--config.train.betas=(0.9,1.0)"], "config.train.betas[1]=1.0 (allowed: a finite number in [0, 1))"),
    "lr nan": (["--config.train.lr=nan"], "config.train.lr=nan (allowed: a finite number > 0)"),
    "temp nan": (["--config.sample.temp=nan"], "config.sample.temp=nan (allowed: a finite number >= 0)"),
    "cfg inf": (["--config.sample.cfg_scale=inf"], "config.sample.cfg_scale=inf (allowed: a finite number >= 0)"),
    "cfg < 0": (["--config.sample.cfg_scale=-1.0"], "config.sample.cfg_scale=-1.0"),
    "ratio > 1": (["--config.sample.ratios=[0.9,0.8,0.7,0.6,1.5,0.4,0.2]"], "config.sample.ratios[4]=1.5"),
    "sample temp < 0": (["--config.sample.sample_temps=[1.0,1.0,1.0,1.0,1.0,1.0,1.0,-1.0]"],
                        "config.sample.sample_temps[7]=-1.0"),
    "strategy lengths": (["--config.sample.guidance=[1.0,2.0]"], "config.sample.guidance=(1.0, 2.0) (allowed: 8 entries"),
    "guidance steps outside": (["--config.sample.guidance_steps=6-9"],
                               "config.sample.guidance_steps='6-9' (allowed: 'all', or step indices and ranges a-b "
                               "with a <= b such as '4-7' within the 8 steps 0..7 of the autonat schedule)"),
    "guidance steps backwards": (["--config.sample.guidance_steps=5-3"], "config.sample.guidance_steps='5-3'"),
    "guidance_power 0": (["--config.sample.guidance_power=0.0"], "config.sample.guidance_power=0.0"),
    "unknown schedule": (["--config.sample.schedule=cosine"], "config.sample.schedule='cosine'"),
    "maskgit steps 0": (["--config.sample.schedule=maskgit", "--config.sample.steps=0"], "config.sample.steps=0"),
    "pixels": (["--config.sample.pixels=floor"], "config.sample.pixels='floor' (allowed: one of 'truncate', 'round')"),
    "negative seed": (["--config.seed=-1"], "config.seed=-1 (allowed: an integer in [0, 2**63)"),
    "seed too large": ([f"--config.seed={2 ** 64}"], f"config.seed={2 ** 64}"),
    "recipe co_ratio 0": (["--config.graph.recipe.co_ratio=0.0"], "config.graph.recipe.co_ratio=0.0 (allowed: a "
                                                                   "finite number in (0, 1])"),
    "recipe sim_alpha nan": (["--config.graph.recipe.sim_alpha=nan"], "config.graph.recipe.sim_alpha=nan"),
    "recipe sim_k >= K": (["--config.graph.recipe.sim_k=32"], "config.graph.recipe.sim_k=32 (allowed: at most "
                                                               "config.model.codebook_size - 1"),
    "recipe neighbourhood": (["--config.graph.recipe.neighbourhood=6"], "config.graph.recipe.neighbourhood=6"),
    "tokenizer norm groups": (["--config.tokenizer.norm_groups=3"], "config.tokenizer.norm_groups=3 (allowed: a "
                                                                     "divisor of every width"),
    "tokenizer resolution": (["--config.tokenizer.resolution=7"], "config.tokenizer.resolution=7"),
    "empty run name": (["--config.run_name="], "config.run_name='' (allowed: a plain folder name"),
    "run name climbs out": (["--config.run_name=../../etc"], "config.run_name='../../etc' (allowed: a plain folder "
                                                              "name (non-empty, no '/'"),
    "run name nested": (["--config.run_name=a/b"], "config.run_name='a/b' (allowed: a plain folder name"),
    "run name backslash": (["--config.run_name=a\\b"], "config.run_name='a\\\\b' (allowed: a plain folder"),
    "run name dot-dot": (["--config.run_name=.."], "config.run_name='..' (allowed: a plain folder name"),
    "run name dot": (["--config.run_name=."], "config.run_name='.' (allowed: a plain folder name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(case):
    overrides, expected = BAD[case]
    with pytest.raises(BadInput) as e:
        parse(*overrides)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"config {TINY}: ")
    assert expected in message, message


def test_every_violation_is_named_at_once():
    with pytest.raises(BadInput) as e:
        parse("--config.train.save_interval=0", "--config.train.batch_size=0", "--config.model.num_heads=5",
              "--config.sample.temp=nan", "--config.train.mixed_precision=fp8")
    assert len(str(e.value).split(": ", 1)[1].split("; ")) == 5 and "\n" not in str(e.value)
    for key in ("train.save_interval=0", "train.batch_size=0", "model.num_heads=5", "sample.temp=nan",
                "train.mixed_precision='fp8'"):
        assert f"config.{key} (allowed: " in str(e.value)


def test_an_override_that_cannot_be_applied_is_reported_with_the_bad_values(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--config.train.lr=abc", "--config.train.n_stepz=3", "--config.train.batch_size=0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: test: ")
    assert "config.train.lr=abc" in err and "config.train.n_stepz" in err and "config.train.batch_size=0" in err


@pytest.mark.parametrize("argv,found", [(["--config.train.n_steps"], "it ends the command line"),
                                        (["--config.train.lr", "--config.train.n_steps=3"],
                                         "--config.train.n_steps=3 follows it"),
                                        (["--config.train.lr", "--device", "cpu"], "--device follows it")])
def test_an_override_without_a_value_is_one_line(argv, found, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"{argv[0]} needs a value" in err and found in err


def test_a_negative_number_is_still_a_value():
    assert parse("--config.train.warmup_steps", "0", "--config.sample.cfg_scale", "-0.0")[1].train.warmup_steps == 0


@pytest.mark.parametrize("body,found", [
    ("def get_config(:\n", "does not load: SyntaxError at line 1"),
    ("x = 1\n", "has no get_config() function"),
    ("def get_config():\n    raise KeyError('boom')\n", "get_config() raised KeyError: 'boom'"),
    ("import not_a_module_anywhere\n", "does not load: ModuleNotFoundError"),
    ("def get_config():\n    return {'seed': 0}\n", "get_config() returned a dict, not an ml_collections.ConfigDict"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, body, found):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(BadInput) as e:
        parse(config=str(path))
    assert found in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_config_file_and_missing_keys():
    with pytest.raises(MissingInput, match="config file not found"):
        parse(config="configs/absent.py")
    config = load_config_file(TINY)
    with config.train.unlocked():
        del config.train["n_steps"]  # a config file without the key
    assert config_violations(config) == ["config.train.n_steps is missing (allowed: an integer >= 1)"]
    with config.model.unlocked():
        config.model.width = 3
    assert "config.model.width is not a key of the model block" in config_violations(config)[1]


def test_ka_mig_needs_a_graph_block():
    config = load_config_file("configs/autonat_l.py")  # no graph block
    config.train.mode = "ka_mig"
    config.train.init_checkpoint = "x.pth"
    assert config_violations(config) == ["config.train.mode='ka_mig' (allowed: 'ka_mig' only in a config with a "
                                         "graph block (configs/ka_mig_l.py has one))"]


def write_strategy(path: Path, **values) -> Path:
    """A strategy file: the published T=8 strategy with `values` replaced."""
    cfg = load_config_file(STRATEGY)
    lines = ["import ml_collections", "def get_config():", "    c = ml_collections.ConfigDict()"]
    for key, value in {**cfg.to_dict(), **values}.items():
        lines.append(f"    c.{key} = {value!r}".replace("nan", "float('nan')").replace("inf", "float('inf')"))
    path.write_text("\n".join(lines + ["    return c", ""]))
    return path


@pytest.mark.parametrize("values,found", [
    (dict(sample_temps=[1.0] * 7 + [math.nan]), "config.sample.sample_temps[7]=nan (allowed: a finite number >= 0)"),
    (dict(conf_temps=[math.inf] + [1.0] * 6), "config.sample.conf_temps[0]=inf"),
    (dict(ratios=[1.2] + [0.5] * 6), "config.sample.ratios[0]=1.2 (allowed: a finite number in [0, 1])"),
    (dict(guidance=[-1.0] + [1.0] * 7), "config.sample.guidance[0]=-1.0"),
    (dict(ratios=[0.5] * 3), "config.sample.ratios=(0.5, 0.5, 0.5) (allowed: 7 entries"),
    (dict(steps=8.0), "config.sample.steps=8.0 (allowed: an integer >= 1)"),
    (dict(guidance_steps="7-9"), "config.sample.guidance_steps='7-9'"),
])
def test_a_strategy_file_with_unusable_values_is_refused(tmp_path, values, found):
    path = write_strategy(tmp_path / "s.py", **values)
    with pytest.raises(BadInput) as e:
        load_strategy_file(path)
    assert str(e.value).startswith(f"--strategy {path}: ") and found in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInput, match=r"--strategy "):  # the sampling scripts' path
        schedule_from_flags(load_config_file(TINY), strategy=str(path))


def test_a_valid_strategy_file_still_loads(tmp_path):
    path = write_strategy(tmp_path / "s.py", guidance_steps="3-7")
    assert schedule_from_flags(load_config_file(TINY), strategy=str(path)).guidance[:3] == [0.0] * 3


@pytest.mark.parametrize("flags,found", [
    (dict(schedule="maskgit", temp=math.nan), "config.sample.temp=nan (from --temp; allowed: a finite number >= 0)"),
    (dict(schedule="maskgit", cfg_scale=math.inf), "config.sample.cfg_scale=inf (from --cfg; allowed:"),
    (dict(schedule="maskgit", cfg_scale=-2.0), "config.sample.cfg_scale=-2.0 (from --cfg; allowed:"),
    (dict(schedule="maskgit", steps=4, guidance_steps="2-5"),
     "config.sample.guidance_steps='2-5' (from --guidance-steps; allowed: 'all', or step indices and ranges a-b "
     "with a <= b such as '4-7' within the 4 steps 0..3 of the maskgit schedule)"),
    (dict(guidance_steps="6-2"), "config.sample.guidance_steps='6-2' (from --guidance-steps"),
    (dict(schedule="maskgit", guidance_schedule="pow-cosine", guidance_power=math.nan),
     "config.sample.guidance_power=nan (from --guidance-power"),
])
def test_sampling_flags_obey_the_same_rules(flags, found):
    with pytest.raises(BadInput) as e:
        schedule_from_flags(load_config_file(TINY), **flags)
    assert found in str(e.value) and "\n" not in str(e.value)


def test_sample_seed_bound_is_what_torch_generator_takes():
    for count in (1, 1000, 2 ** 32):
        top = max_sample_seed(count)
        torch.Generator().manual_seed(top * SEED_STRIDE + count - 1)  # the last sample of the largest seed
        with pytest.raises((RuntimeError, ValueError, OverflowError)):
            torch.Generator().manual_seed((top + 1) * SEED_STRIDE + count - 1)
        check_sample_seed(top, count=count)
        with pytest.raises(BadInput, match=f"--seed {top + 1} is outside \\[0, {top}\\]"):
            check_sample_seed(top + 1, count=count)
    with pytest.raises(BadInput, match="--seed -1 is outside"):
        check_sample_seed(-1)


def test_config_seed_bound_leaves_room_for_offsets():
    torch.Generator().manual_seed(SEED_LIMIT - 1 + 10 ** 6)  # seed + epoch of the training batches
    assert parse(f"--config.seed={SEED_LIMIT - 1}")[1].seed == SEED_LIMIT - 1
    with pytest.raises(BadInput, match=f"config.seed={SEED_LIMIT} "):
        parse(f"--config.seed={SEED_LIMIT}")


def test_resolve_config_of_the_demo_drivers():
    assert resolve_config("configs/demo_smoke.py", [("train.n_steps", "5")]).train.n_steps == 5
    with pytest.raises(BadInput) as e:
        resolve_config("configs/demo_smoke.py", [("demo.ci_level", "1.0"), ("demo.nope", "1")])
    assert "config.demo.nope" in str(e.value) and "config.demo.ci_level=1.0 (allowed: a finite number in (0, 1))" \
        in str(e.value)


def test_train_graph_refuses_bad_values_before_any_work(tmp_path, capsys):
    import train_graph
    out = tmp_path / "out"
    argv = ["--config", TINY, f"--config.output_dir={out}", f"--config.data.path={tmp_path / 'absent'}",
            "--config.train.save_interval=0", "--config.train.mask_beta=(0,0)", "--config.model.num_heads=3"]
    with pytest.raises(BadInput, match="config.train.save_interval=0"):
        train_graph.main(argv)  # before the (absent) token dataset is read
    with pytest.raises(SystemExit) as e:
        run_main(train_graph.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: config {TINY}: ")
    for key in ("train.save_interval=0", "train.mask_beta[0]=0", "train.mask_beta[1]=0", "model.num_heads=3"):
        assert f"config.{key} (allowed: " in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_graph_checks_the_precision_from_the_environment(tmp_path, monkeypatch):
    import train_graph
    monkeypatch.setenv(train_graph.PRECISION_ENV, "fp8")
    with pytest.raises(BadInput, match="config.train.mixed_precision='fp8' \\(from ACCELERATE_MIXED_PRECISION; "):
        train_graph.main(["--config", TINY, f"--config.output_dir={tmp_path / 'out'}"])
    assert list(tmp_path.iterdir()) == []


def test_generate_npz_refuses_bad_sampling_values_before_any_file(tmp_path):
    import generate_npz
    out = tmp_path / "npz"
    base = ["--config", TINY, "--config.tokenizer.checkpoint=vq.pth", "--device", "cpu", "--no-fid",
            "--out", str(out), "--num-samples", "4"]
    with pytest.raises(BadInput, match="from --temp; allowed"):
        generate_npz.main(base + ["--schedule", "maskgit", "--temp", "nan"])
    with pytest.raises(BadInput, match="from --guidance-steps; allowed"):
        generate_npz.main(base + ["--guidance-steps", "3-12"])
    with pytest.raises(BadInput, match=f"--seed {2 ** 60} is outside"):
        generate_npz.main(base + ["--seed", str(2 ** 60)])
    assert not out.exists()


def test_docs_table_names_every_key():
    """docs/configs.md lists every key with a rule (by its name, its last part, or a `*.suffix` pattern)."""
    import re
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configs.md").read_text()
    words = {w for t in re.findall(r"`([^`]+)`", doc) for w in re.split(r"[ ,/]", t)}
    assert [k for k in RULES if k not in words and k.split(".")[-1] not in words
            and not any(w.startswith("*") and k.endswith(w[1:]) for w in words)] == []


def test_a_strategy_file_given_as_the_config_is_named_so():
    with pytest.raises(BadInput) as e:
        parse(config=STRATEGY)
    message = str(e.value)
    assert "this is a decoding strategy" in message and "--strategy" in message and "\n" not in message
    assert "config.model is missing (a block" in message and message.count("config.model") == 1  # once per block
