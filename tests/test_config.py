"""Configs: overrides typed like the defaults, unknown keys refused."""
import argparse

import pytest

from libs.config import load_config_file, parse_args_with_config


def test_overrides_and_types():
    args, config = parse_args_with_config(
        argparse.ArgumentParser(), "configs/ka_mig_l.py",
        ["--config.train.n_steps=10", "--config.train.lr", "3e-4", "--config.graph.use_co=false",
         "--config.train.betas=(0.9,0.95)"])
    assert config.train.n_steps == 10 and config.train.lr == 3e-4
    assert config.graph.use_co is False and config.train.betas == (0.9, 0.95)


@pytest.mark.parametrize("arg", ["--config.train.n_stepz=3", "--config.nothing.x=1"])
def test_unknown_key_is_an_error(arg, capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(argparse.ArgumentParser(), "configs/ka_mig_l.py", [arg])
    assert "unknown config key" in capsys.readouterr().err


def test_defaults_reproduce_the_paper():
    ka = load_config_file("configs/ka_mig_l.py")
    assert (ka.train.mode, ka.train.n_steps, ka.train.batch_size, ka.train.lr) == ("ka_mig", 1500, 2400, 1e-4)
    assert ka.train.warmup_steps == 300 and ka.train.weight_decay == 0.0 and ka.train.ema_rate == 0.9999
    pre = load_config_file("configs/autonat_l.py")
    assert (pre.train.lr, pre.train.batch_size, pre.train.warmup_steps) == (4e-4, 2048, 5000)
    assert len(pre.sample.sample_temps) == 8


def test_graph_recipe_comes_from_the_config_and_flags_override_it():
    from graph_construction.build_graphs import RECIPE_FLAGS, parse_args
    config = load_config_file("configs/ka_mig_l.py")
    args = parse_args(["--tokens", "t"])
    assert {k: getattr(args, k) for k in RECIPE_FLAGS} == dict(config.graph.recipe)
    assert args.out == config.graph.dir == "graph_prior"
    assert parse_args(["--tokens", "t", "--config.graph.recipe.sim_k=4"]).sim_k == 4
    assert parse_args(["--tokens", "t", "--config.graph.recipe.sim_k=4", "--sim-k", "3"]).sim_k == 3  # flag wins
    assert parse_args(["--tokens", "t", "--config.graph.dir=/x"]).out == "/x"


def test_derived_sizes_are_not_set_twice():
    from libs.models.factory import build_model
    from tests.helpers import tiny_graphs
    config = load_config_file("configs/tiny.py")
    assert "gcn_hidden" not in config.graph  # the GCN width is model.embed_dim
    model = build_model(config, "ka_mig", graphs=tiny_graphs())
    conv = model.graph_layer.co_graph_layer.conv1.lin
    assert tuple(conv.weight.shape) == (config.model.embed_dim, config.model.embed_dim)
    with config.model.unlocked():
        config.model.unused_key = 1
    with pytest.raises(TypeError, match="unused_key"):
        build_model(config, "autonat")  # every key of the model block is a backbone size
