"""--log-with of the demo drivers and the strategy search: figures, headline numbers and tables of a finished run
go to TensorBoard in <out>/tb/ (read back with EventAccumulator); none writes nothing; a missing package is one
line before any work."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from demo import ablation, report, run_demo
from libs.errors import UserError
from libs.training import tracking
from tests.test_strategy_search import search  # noqa: F401 (the tiny search fixture)


def events(out):
    """EventAccumulator of <out>/tb with every event kept (purged steps dropped, as TensorBoard shows)."""
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(out) -> dict:
    """{tag: [(step, value)]} of the scalars in <out>/tb."""
    acc = events(out)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def png(path, seed: int, shape=(5, 7)):
    """A tiny RGB PNG of seeded random pixels; -> its [H, W, 3] uint8 pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def fake_metrics(out, shift: float = 0.0) -> dict:
    """The parts of a demo's metrics.json that --log-with reads, with two models and tiny figures in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pixels = {name: png(out / f"{name}.png", k) for k, name in enumerate(("comparison", "curves", "grid_ka_mig",
                                                                          "grid_control"))}
    metrics = {"nll": {"models": {"ka_mig": {"overall": {"mean": 2.5 + shift}},
                                  "control": {"overall": {"mean": 2.625 + shift}}},
                       "differences": {"ka_mig-control": {"overall": {"mean": -0.125}}}},
               "fid": {"models": {"ka_mig": {"fid": 30.5 + shift}, "control": {"fid": 32.0}},
                       "differences": {"ka_mig-control": {"diff": -1.5 - shift}}},
               "outputs": {"comparison": str(out / "comparison.png"), "curves": str(out / "curves.png"),
                           "grids": {"ka_mig": str(out / "grid_ka_mig.png"),
                                     "control": str(out / "grid_control.png")}}}
    return metrics, pixels


def test_demo_figures_and_numbers_go_to_tensorboard(tmp_path):
    metrics, pixels = fake_metrics(tmp_path)
    report.log_demo("tensorboard", metrics)
    assert scalars(tmp_path) == {"nll/ka_mig": [(0, 2.5)], "nll/control": [(0, 2.625)],
                                 "nll_diff/ka_mig-control": [(0, -0.125)], "fid/ka_mig": [(0, 30.5)],
                                 "fid/control": [(0, 32.0)], "fid_diff/ka_mig-control": [(0, -1.5)]}
    acc = events(tmp_path)
    tags = {"comparison": "comparison", "curves": "curves", "grid/ka_mig": "grid_ka_mig",
            "grid/control": "grid_control"}
    assert set(acc.Tags()["images"]) == set(tags)
    for tag, name in tags.items():
        [image] = acc.Images(tag)
        assert image.step == 0 and (image.height, image.width) == pixels[name].shape[:2]
        decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        assert np.array_equal(decoded, pixels[name]), tag  # PNG is lossless: the figure's pixels exactly
    # a second run into the same folder: TensorBoard shows that run's numbers only
    metrics, _ = fake_metrics(tmp_path, shift=1.0)
    report.log_demo("tensorboard", metrics)
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    again = scalars(tmp_path)
    assert again["nll/ka_mig"] == [(0, 3.5)] and again["fid_diff/ka_mig-control"] == [(0, -2.5)]
    assert len(events(tmp_path).Images("curves")) == 1


def test_log_with_none_writes_nothing(tmp_path):
    metrics, _ = fake_metrics(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    report.log_demo("none", metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_rows_at_their_steps_and_a_text_table(tmp_path):
    """The search's per-candidate values (step = candidate index) and the ablation's markdown table."""
    tracking.log_run("tensorboard", tmp_path, "x", [(0, {"search/fid": 9.0}), (1, {"search/fid": 7.5}),
                                                    (2, {"search/fid": 8.25})], texts={"ablation": "| a | b |"})
    assert scalars(tmp_path) == {"search/fid": [(0, 9.0), (1, 7.5), (2, 8.25)]}
    [text] = events(tmp_path).Tensors("ablation/text_summary")
    assert text.step == 0 and text.tensor_proto.string_val == [b"| a | b |"]


def test_ablation_numbers_and_table(tmp_path, monkeypatch):
    """The ablation has no figures: its headline numbers, and its markdown table as text."""
    monkeypatch.setattr(ablation, "markdown", lambda rows, nll, fid, diag, meta: f"| {len(rows)} | {meta['date']} |")
    metrics, _ = fake_metrics(tmp_path)
    result = {"rows": [{}, {}], "nll": metrics["nll"], "fid": metrics["fid"], "diagnostics": {},
              "meta": {"date": "2026-12-02"}}
    ablation.log_ablation("tensorboard", tmp_path, result)
    assert scalars(tmp_path) == {"nll/ka_mig": [(0, 2.5)], "nll/control": [(0, 2.625)],
                                 "nll_diff/ka_mig-control": [(0, -0.125)], "fid/ka_mig": [(0, 30.5)],
                                 "fid/control": [(0, 32.0)], "fid_diff/ka_mig-control": [(0, -1.5)]}
    [text] = events(tmp_path).Tensors("ablation/text_summary")
    assert text.tensor_proto.string_val == [b"| 2 | 2026-12-02 |"]
    assert not events(tmp_path).Tags()["images"]


@pytest.fixture
def no_wandb(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))


MISSING = "error: --log-with 'wandb' needs the wandb package: pip install wandb (or --log-with none)\n"


@pytest.mark.parametrize("driver", [run_demo, ablation])
def test_demo_drivers_refuse_a_missing_package_before_any_stage(driver, no_wandb, tmp_path, capsys, monkeypatch):
    import demo.pipeline
    for module in (demo.pipeline, ablation):
        monkeypatch.setattr(module, "prepare_run", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(SystemExit) as e:
        driver.main(["--log-with", "wandb", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == MISSING
    assert not (tmp_path / "out").exists()


def test_log_with_flag_is_validated(capsys):
    with pytest.raises(SystemExit) as e:
        run_demo.main(["--log-with", "mlflow"])
    assert e.value.code == 2 and "--log-with: invalid choice: 'mlflow'" in capsys.readouterr().err


def test_strategy_search_logs_every_candidate(search, tmp_path):
    run, calls, _, _ = search
    out = tmp_path / "s"
    result = run(out, "--log-with", "tensorboard")
    evals = [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()[1:]]
    fids = [np.float32(e["objective"]) for e in evals if e["type"] == "eval"]
    got = scalars(out)
    assert got["search/fid"] == list(enumerate(fids)) and len(fids) == 3
    assert got["search/best_fid"] == list(enumerate(np.minimum.accumulate(fids)))
    h = result["heldout"]
    assert got["heldout/start_mean"] == [(2, np.float32(h["start_mean"]))]  # at the last candidate's index
    assert got["heldout/best_mean"] == [(2, np.float32(h["best_mean"]))]
    assert set(got) == {"search/fid", "search/best_fid", "heldout/start_mean", "heldout/best_mean",
                        "heldout/paired_difference_mean"}


def test_strategy_search_refuses_a_missing_package_first(search, no_wandb, tmp_path):
    run, calls, _, _ = search
    with pytest.raises(UserError, match="^--log-with 'wandb' needs the wandb package: pip install wandb"):
        run(tmp_path / "s", "--log-with", "wandb")
    assert not calls and not (tmp_path / "s").exists()
