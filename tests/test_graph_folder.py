"""A graph folder is written and read as a whole: build_graphs checks its recipe before counting and renames the
graphs into place together; training and sampling refuse graphs of two token datasets or of another model."""
import shutil

import numpy as np
import pytest

from libs.data.tokens import dataset_sha256
from libs.errors import BadInput, MissingInput
from libs.graphs import recipes as G
from libs.graphs.files import GRAPH_FILES, graph_paths, load_graph_folder, meta_path, read_meta
from tests.helpers import load_build_graphs_cli, write_random_token_dir

PAPER = dict(max_images=50_000, seed=0, neighbourhood=8, co_ratio=0.05, sim_k=2, sim_alpha=5.0,
             sim_measure="divergence", sim_frobenius_norm=False)
TINY = dict(K=32, grid=4, C=4)  # the sizes of configs/tiny.py (and of the tiny_assets models)


def build(tokens, out, *flags):
    """build_graphs in process into `out`; returns {name: path}."""
    return load_build_graphs_cli().main(["--tokens", str(tokens), "--out", str(out), "--num-threads", "1", *flags])


def folder_bytes(folder):
    """{file name: bytes} of every entry of `folder`, hidden ones included."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Token datasets a and b (tiny sizes, other seeds) and a full graph folder built from each."""
    root = tmp_path_factory.mktemp("graphs")
    for name, seed in (("a", 0), ("b", 1)):
        write_random_token_dir(root / f"tok_{name}", N=80, seed=seed, **TINY)
        build(root / f"tok_{name}", root / f"g_{name}")
    return root


def mixed_folder(root, dest):
    """A copy of g_a whose G_s (and its sidecar) come from g_b."""
    shutil.copytree(root / "g_a", dest)
    for f in (GRAPH_FILES["sim"], GRAPH_FILES["sim"] + ".json"):
        shutil.copy(root / "g_b" / f, dest / f)
    return dest


# ----------------------------------------------------------------------------- the recipe


def test_recipe_problems_name_every_unusable_value():
    assert G.recipe_problems(PAPER) == [] and G.recipe_problems(PAPER, codebook_size=3) == []
    bad = dict(max_images=1.5, seed=-1, neighbourhood=6, co_ratio=float("nan"), sim_k=0, sim_alpha=float("inf"),
               sim_measure="cosine", sim_frobenius_norm="yes")
    assert [k for k, _, _ in G.recipe_problems(bad)] == list(PAPER)
    assert [k for k, _, _ in G.recipe_problems(bad, ("co",))] == ["max_images", "seed", "neighbourhood", "co_ratio"]
    assert G.recipe_problems(bad, ("incompat",)) == []  # G_p takes no recipe value
    for key, values in {"co_ratio": (0, -0.5, 1.0001, True, float("-inf"), "0.1"),
                        "sim_alpha": (-1.0, float("nan"), None), "sim_k": (0, 32, 2.0, True)}.items():
        for v in values:
            assert [k for k, _, _ in G.recipe_problems({**PAPER, key: v}, codebook_size=32)] == [key], (key, v)
    for key, v in (("co_ratio", 1), ("sim_alpha", 0), ("sim_k", 31), ("max_images", None), ("max_images", -1)):
        assert G.recipe_problems({**PAPER, key: v}, codebook_size=32) == [], (key, v)
    assert G.recipe_problems({**PAPER, "sim_k": 32}, codebook_size=32) == [("sim_k", 32, "an integer in [1, K-1] = "
                                                                                         "[1, 31]")]


@pytest.mark.parametrize("flags,words", [
    (["--sim-k", "0"], "--sim-k / config.graph.recipe.sim_k = 0"),
    (["--sim-k", "32"], "sim_k = 32 (allowed: an integer in [1, K-1] = [1, 31])"),
    (["--co-ratio", "0"], "co_ratio = 0.0 (allowed: a number in (0, 1])"),
    (["--co-ratio", "nan"], "co_ratio = nan"),
    (["--sim-alpha", "nan"], "sim_alpha = nan (allowed: a finite number >= 0)"),
    (["--sim-alpha=-inf"], "sim_alpha = -inf"),
    (["--seed=-1"], "seed = -1"),
    (["--num-threads", "0"], "--num-threads = 0"),
])
def test_bad_recipe_is_refused_before_counting_and_replaces_nothing(two_builds, tmp_path, monkeypatch, flags, words):
    out = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    before = folder_bytes(out)

    def counted(*a, **k):
        raise AssertionError("counting started")
    for fn in ("co_occurrence_counts", "position_histograms", "occurrence_bits"):
        monkeypatch.setattr(G, fn, counted)
    with pytest.raises(BadInput) as err:
        build(two_builds / "tok_b", out, *flags)
    assert str(err.value).startswith("unusable graph recipe: ") and words in str(err.value)
    assert folder_bytes(out) == before


# ----------------------------------------------------------------------------- writing as a whole


def test_a_failed_build_leaves_the_old_graphs_and_no_stage(two_builds, tmp_path, monkeypatch):
    out = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    before = folder_bytes(out)

    def killed(*a, **k):  # G_co and G_s are written by now, G_p fails
        raise RuntimeError("killed while counting G_p")
    monkeypatch.setattr(G, "occurrence_bits", killed)
    with pytest.raises(RuntimeError, match="killed"):
        build(two_builds / "tok_b", out)
    assert folder_bytes(out) == before  # neither G_co nor G_s of tok_b next to G_p of tok_a; no staging folder


def test_a_rebuild_replaces_every_graph_from_the_new_tokens(two_builds, tmp_path):
    out = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    written = build(two_builds / "tok_b", out)
    assert written == graph_paths(out)
    assert folder_bytes(out) == folder_bytes(two_builds / "g_b")  # same files, same bytes, nothing else
    sha = dataset_sha256(two_builds / "tok_b")
    assert {read_meta(p)["source_sha256"] for p in written.values()} == {sha}


def test_building_some_graphs_next_to_another_datasets_is_refused(two_builds, tmp_path):
    out = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    before = folder_bytes(out)
    with pytest.raises(BadInput, match=r"holds G_co of another token dataset .*build all graphs"):
        build(two_builds / "tok_b", out, "--graphs", "sim")
    assert folder_bytes(out) == before
    copy = shutil.copytree(two_builds / "tok_a", tmp_path / "tok_a_moved")  # same tokens elsewhere: the same data
    build(copy, out, "--graphs", "sim", "--sim-k", "3")
    load_graph_folder(out, list(GRAPH_FILES), 32, 16, 4)
    assert read_meta(out / GRAPH_FILES["sim"])["recipe"]["k"] == 3


# ----------------------------------------------------------------------------- reading as a whole


def test_a_mixed_folder_is_refused_naming_both_datasets(two_builds, tmp_path):
    mixed = mixed_folder(two_builds, tmp_path / "mixed")
    with pytest.raises(BadInput) as err:
        load_graph_folder(mixed, ["co", "sim", "incompat"], 32, 16, 4)
    text = str(err.value)
    assert "mixes graphs of two token datasets" in text and "G_co was built from" in text and "G_s from" in text
    assert str((two_builds / "tok_a").resolve()) in text and str((two_builds / "tok_b").resolve()) in text
    graphs = load_graph_folder(mixed, ["co", "incompat"], 32, 16, 4)  # G_s switched off: not read, not mixed
    assert set(graphs) == {"co", "incompat"} and graphs["co"][2] == 32 and tuple(graphs["incompat"].shape) == (4, 16, 4)


def test_a_graph_file_replaced_without_its_sidecar_is_refused(two_builds, tmp_path):
    folder = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    shutil.copy(two_builds / "g_b" / GRAPH_FILES["co"], folder / GRAPH_FILES["co"])
    with pytest.raises(BadInput, match="is not the file its sidecar .* describes"):
        load_graph_folder(folder, ["co"], 32, 16, 4)
    meta_path(folder / GRAPH_FILES["co"]).unlink()  # no sidecar: the file is taken as it is (released files)
    assert load_graph_folder(folder, ["co"], 32, 16, 4)["co"][2] == 32


@pytest.mark.parametrize("sidecars", [True, False])
def test_graphs_of_another_model_are_refused_naming_both_sides(two_builds, tmp_path, sidecars):
    folder = shutil.copytree(two_builds / "g_a", tmp_path / "g")
    if not sidecars:
        for p in folder.glob("*.json"):
            p.unlink()
    for names, sizes, words in (
            (["co"], (64, 16, 4), "32 codes but the model has 64" if sidecars else "over 32 tokens (a 32-code"),
            (["sim"], (16, 16, 4), "32 codes but the model has 16" if sidecars else "over 32 tokens (a 32-code"),
            (["incompat"], (64, 16, 4), "32 codes but the model has 64 (config.model.codebook_size)"),
            (["incompat"], (32, 25, 4), "16 tokens per image but the model has 25 (config.model.seq_len)"),
            (["incompat"], (32, 16, 5), "holds 4 classes, the model has 5")):
        with pytest.raises(BadInput, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_graph_folder(folder, names, *sizes)
    with pytest.raises(MissingInput, match="graph file not found"):
        load_graph_folder(tmp_path / "nowhere", ["co"], 32, 16, 4)


def test_training_and_sampling_refuse_a_mixed_folder_before_any_work(two_builds, tiny_assets, tmp_path):
    import generate_img
    import train_graph
    root, overrides = tiny_assets
    mixed = str(mixed_folder(two_builds, tmp_path / "mixed"))
    with pytest.raises(BadInput, match="mixes graphs of two token datasets"):
        generate_img.main(["--checkpoint", str(root / "ka_mig.pth"), "--classes", "1", "--per-class", "1",
                           "--out", str(tmp_path / "img"), "--device", "cpu", *overrides, f"--config.graph.dir={mixed}"])
    assert not list(tmp_path.glob("img/**/*.png"))
    with pytest.raises(BadInput, match="mixes graphs of two token datasets"):
        train_graph.main([*overrides, f"--config.graph.dir={mixed}", f"--config.data.path={two_builds / 'tok_a'}",
                          f"--config.output_dir={tmp_path / 'runs'}", "--config.train.mode=ka_mig",
                          f"--config.train.init_checkpoint={root / 'backbone.pth'}", "--config.train.n_steps=1"])
    assert not list(tmp_path.glob("runs/**/*.pt")) and not list(tmp_path.glob("runs/**/*.pth"))
