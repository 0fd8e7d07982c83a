"""libs/app/logic.py (the interactive page without gradio) on the committed demo weights: the page's grids and
edits equal generate_img.py's bit for bit, uploads and brush layers are checked with one-line messages."""
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from libs.app import logic
from libs.data.images import load_image_file
from libs.errors import BadInput, MissingInput

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--config", logic.DEMO_CONFIG, "--model", "autonat", "--checkpoint", logic.DEMO_CHECKPOINT, "--device", "cpu"]


@pytest.fixture(scope="module")
def models():
    return logic.load_models(logic.choose_weights("demo"))


def pngs(run_dir, pattern):
    """uint8 [N,H,W,3] of a run folder's PNGs in index order."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(run_dir.glob(pattern))])


def one_line_error(excinfo, *words):
    """The message is one line and names every word."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message


# ----------------------------------------------------------------------------- the same pixels as the scripts


def test_grid_equals_generate_img_bit_for_bit(models, tmp_path):
    import generate_img
    settings = logic.page_settings("maskgit", None, 4, 2.5, 3.0, "pow-cosine", 2.0, "1-3", "halton", 5)
    images, labels = logic.sample_grid(models, [3, 7], 2, settings)
    run_dir = generate_img.main([*DEMO, "--classes", "3", "7", "--per-class", "2", "--schedule", "maskgit",
                                 "--steps", "4", "--cfg", "2.5", "--temp", "3", "--guidance-schedule", "pow-cosine",
                                 "--guidance-power", "2", "--guidance-steps", "1-3", "--order", "halton",
                                 "--seed", "5", "--out", str(tmp_path)])
    assert labels.tolist() == [3, 3, 7, 7]
    assert np.array_equal(images, pngs(run_dir, "0*_class*.png"))
    assert images.std() > 0  # not a constant image
    grid = logic.grid_image(models, images, labels, columns=2)
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(run_dir / "grid.png").convert("RGB")))


def test_strategy_file_grid_equals_generate_img(models, tmp_path):
    import generate_img
    strategy = "configs/autonat_t8_strategy.py"
    # the maskgit controls are ignored under a strategy file, as the page says
    settings = logic.page_settings("maskgit", strategy, 3, 9.0, 1.0, "constant", 3.0, "all", "confidence", 0)
    assert settings.schedule is None and settings.steps is None and settings.strategy == strategy
    images, _ = logic.sample_grid(models, [1], 3, settings)
    run_dir = generate_img.main([*DEMO, "--classes", "1", "--per-class", "3", "--strategy", strategy,
                                 "--out", str(tmp_path)])
    assert np.array_equal(images, pngs(run_dir, "0*_class*.png"))
    assert logic.build_schedule(models, settings).steps == 8
    assert models.config.sample.schedule == "maskgit"  # the loaded config is never changed by a request


def brush_layer(size, box):
    """RGBA [size,size,4] with the canvas box (x0, y0, x1, y1) painted magenta."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 0, 255, 255)
    return layer


@pytest.mark.parametrize("mode,mask_arg", [("inpaint", "8,4,16,20"), ("outpaint", "outside:8,4,16,20")])
def test_edit_equals_generate_img_edit_bit_for_bit(models, tmp_path, mode, mask_arg):
    import generate_img
    r, factor = models.resolution, logic.display_factor(models.resolution)
    assert (r, factor) == (32, 8)
    source, _ = logic.sample_grid(models, [0], 1, logic.Settings(seed=3))
    Image.fromarray(source[0]).save(tmp_path / "in.png")
    image, _ = logic.check_upload(tmp_path / "in.png", r)
    brush = logic.brush_mask([brush_layer(r * factor, (64, 32, 128, 160))], r)  # canvas -> pixels 8..15, 4..19
    expected = np.zeros((r, r), dtype=bool)
    expected[4:20, 8:16] = True
    assert np.array_equal(brush, expected)
    settings = logic.page_settings("maskgit", None, 4, 2.0, 4.5, "linear", 1.0, "all", "confidence", 2)
    result = logic.run_edit(models, image, logic.edit_region(brush, mode), 5, 3, settings)
    run_dir = generate_img.main([*DEMO, "--edit", str(tmp_path / "in.png"), "--mask", mask_arg, "--class", "5",
                                 "--per-class", "3", "--schedule", "maskgit", "--steps", "4", "--seed", "2",
                                 "--out", str(tmp_path / "out")])
    assert np.array_equal(result.edits, pngs(run_dir, "*_edit_class5.png"))
    assert np.array_equal(np.asarray(result.strip), np.asarray(Image.open(run_dir / "strip.png").convert("RGB")))
    # 8x8 tokens of 4x4 pixels: the box covers token columns 2-3 and rows 1-4
    tokens = np.zeros((8, 8), dtype=bool)
    tokens[1:5, 2:4] = True
    assert np.array_equal(result.unknown, (tokens if mode == "inpaint" else ~tokens).reshape(-1))
    assert not np.array_equal(result.edits[0], result.edits[1])  # variants differ


# ----------------------------------------------------------------------------- brush layers


def test_brush_layers_map_onto_preprocessed_pixels():
    layer = np.zeros((300, 300, 4), dtype=np.uint8)  # a canvas that is no multiple of 32
    layer[299, 299, 3] = 1
    layer[0, 10, 3] = 255
    other = np.zeros((300, 300, 4), dtype=np.uint8)
    other[150, 0, 3] = 9
    mask = logic.brush_mask([layer, other], 32)
    assert set(zip(*np.nonzero(mask))) == {(31, 31), (0, 1), (16, 0)}


@pytest.mark.parametrize("layers", [None, [], [np.zeros((256, 256, 4), dtype=np.uint8)]])
def test_an_empty_brush_is_refused(layers):
    with pytest.raises(BadInput) as e:
        logic.brush_mask(layers, 32)
    one_line_error(e, "brush layer is empty")


def test_outpaint_with_everything_painted_and_bad_layers_are_refused():
    with pytest.raises(BadInput) as e:
        logic.edit_region(np.ones((32, 32), dtype=bool), "outpaint")
    one_line_error(e, "outpaint", "whole image")
    with pytest.raises(BadInput) as e:
        logic.edit_region(np.ones((32, 32), dtype=bool), "erase")
    one_line_error(e, "inpaint, outpaint")
    with pytest.raises(BadInput) as e:
        logic.brush_mask([np.ones((8, 8, 3), dtype=np.uint8)], 32)
    one_line_error(e, "RGBA")


# ----------------------------------------------------------------------------- uploads


def png_with_size(path, width, height):
    """A PNG whose header declares width x height over the data of a 1x1 image (PIL reads the header only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
                     + chunk(b"IEND", b""))
    return path


def noise_png(path):
    """A 64x64 PNG of random pixels (about 12 kB: cutting it leaves a readable header and missing data)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("make,words", [
    (lambda p: p.write_text("hello, not a picture\n"), ["notes.png", "not an image"]),
    (lambda p: p.write_bytes(b""), ["notes.png", "empty file"]),
    (lambda p: png_with_size(p, 50000, 50000), ["notes.png", "huge", "decompression bomb", "40 megapixels"]),
    (lambda p: png_with_size(p, 8000, 6000), ["notes.png", "8000x6000", "48.0 megapixels", "up to 40"]),
    (lambda p: p.write_bytes(noise_png(p).read_bytes()[:2000]), ["notes.png", "truncated"]),
])
def test_bad_uploads_give_one_line_messages(tmp_path, make, words):
    path = tmp_path / "notes.png"
    make(path)
    with pytest.raises(BadInput) as e:
        logic.check_upload(path, 32)
    one_line_error(e, *words)


def test_large_files_and_missing_uploads_are_refused(tmp_path):
    path = noise_png(tmp_path / "big.png")
    with pytest.raises(BadInput) as e:
        logic.check_upload(path, 32, max_bytes=1000)
    one_line_error(e, "big.png", "MB", "up to 0.001 MB")
    with pytest.raises(MissingInput) as e:
        logic.check_upload(None, 32)
    one_line_error(e, "no image")


@pytest.mark.parametrize("mode,suffix,note", [("RGBA", ".png", "alpha dropped"), ("L", ".png", "gray copied"),
                                              ("CMYK", ".jpg", "CMYK converted")])
def test_other_modes_are_converted_by_the_one_reader_and_named(tmp_path, mode, suffix, note):
    rgb = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(rgb).convert(mode).save(path)
    image, message = logic.check_upload(path, 32)
    assert np.array_equal(image, load_image_file(path, 32))  # the project's reader and centre crop
    assert image.shape == (32, 32, 3)
    assert "\n" not in message and f"48x40 {mode}" in message and note in message and "centre-cropped" in message


# ----------------------------------------------------------------------------- settings, weights, strategy files


def test_page_settings_apply_the_maskgit_controls_to_maskgit_only():
    autonat = logic.page_settings("autonat", None, 4, 2.0, 4.5, "linear", 1.0, " 4-7 ", "halton", 1)
    assert (autonat.schedule, autonat.steps, autonat.cfg, autonat.guidance_schedule) == ("autonat", None, None, None)
    assert (autonat.guidance_steps, autonat.order, autonat.seed) == ("4-7", "halton", 1)
    for seed in (-1, 1.5, None):
        with pytest.raises(BadInput) as e:
            logic.page_settings("maskgit", None, 4, 2.0, 4.5, "linear", 1.0, "all", "confidence", seed)
        one_line_error(e, "seed")


def test_bad_settings_and_classes_are_one_line_errors(models):
    with pytest.raises(BadInput) as e:
        logic.sample_grid(models, [3], 1, logic.page_settings("maskgit", None, 4, 2.0, 4.5, "linear", 1.0, "9",
                                                              "confidence", 0))
    one_line_error(e, "guidance")
    with pytest.raises(BadInput) as e:
        logic.sample_grid(models, [10], 1, logic.Settings())
    one_line_error(e, "[10]", "[0, 10)")
    with pytest.raises(BadInput) as e:
        logic.sample_grid(models, [], 1, logic.Settings())
    one_line_error(e, "no class")
    with pytest.raises(BadInput) as e:
        logic.sample_grid(models, list(range(10)), 8, logic.Settings())
    one_line_error(e, "80 images", "1 to 64")


def test_weights_are_found_in_assets_or_the_demo_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    auto = logic.choose_weights("auto")
    assert (auto.config, auto.checkpoint) == (logic.DEMO_CONFIG, logic.DEMO_CHECKPOINT)
    assert "\n" not in auto.note and "assets/vqgan_jax_strongaug.ckpt" in auto.note and "demo weights" in auto.note
    with pytest.raises(MissingInput) as e:
        logic.choose_weights("imagenet")
    one_line_error(e, "--weights imagenet", "assets/vqgan_jax_strongaug.ckpt", "assets/nnet_ema.pth")
    (tmp_path / "assets").mkdir()
    for name in ("vqgan_jax_strongaug.ckpt", "nnet_ema.pth"):
        (tmp_path / "assets" / name).write_bytes(b"x")
    found = logic.choose_weights("auto")
    assert (found.config, found.kind, found.checkpoint) == (logic.IMAGENET_CONFIG, "autonat", "assets/nnet_ema.pth")
    assert logic.choose_weights("demo").checkpoint == logic.DEMO_CHECKPOINT  # asked for: the demo all the same


def test_the_demo_weights_are_the_committed_safetensors_files():
    """The page's demo weights are the demo config's own backbone and tokenizer, both .safetensors by content."""
    from libs.checkpoint import weights_format
    from libs.config import resolve_config
    config = resolve_config(logic.DEMO_CONFIG, [])
    assert logic.DEMO_CHECKPOINT == config.train.init_checkpoint
    for path in (logic.DEMO_CHECKPOINT, config.tokenizer.checkpoint):
        assert path.endswith(".safetensors") and weights_format(REPO / path) == "safetensors", path


def test_strategy_files_are_listed_and_described(tmp_path):
    assert "configs/autonat_t8_strategy.py" in logic.strategy_files()
    assert logic.strategy_files(["mine.py"])[0] == "mine.py"
    line = logic.describe_strategy("configs/autonat_t8_strategy.py")
    assert "autonat schedule, T=8" in line and "\n" not in line
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n")
    with pytest.raises(BadInput) as e:
        logic.describe_strategy(bad)
    one_line_error(e, "broken.py")


def test_app_py_says_in_one_line_when_gradio_is_missing(monkeypatch):
    import app
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(MissingInput) as e:
        app.main(["--weights", "demo"])
    one_line_error(e, "gradio is not installed", "make app")
    with pytest.raises(BadInput) as e:
        app.main(["--port", "70000"])
    one_line_error(e, "--port 70000")


def test_a_trained_run_loads_as_generate_img_loads_it(tiny_assets):
    root, overrides = tiny_assets
    keys = [(o[len("--config."):].split("=", 1)) for o in overrides if o.startswith("--config.")]
    choice = logic.choose_weights("demo", overrides[1], str(root / "ka_mig.pth"), None, keys)
    assert choice.config == "configs/tiny.py" and str(root / "ka_mig.pth") in choice.note
    run = logic.load_models(choice)
    assert run.kind == "ka_mig" and run.checkpoint == str(root / "ka_mig.pth")  # the config's default kind
    images, labels = logic.sample_grid(run, [1, 2], 2, logic.Settings(seed=4))
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [1, 1, 2, 2]
    with pytest.raises(MissingInput) as e:
        logic.load_models(logic.choose_weights("demo", overrides[1], str(root / "absent.pth"), None, keys))
    assert "absent.pth" in str(e.value)
