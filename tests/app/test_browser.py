"""The page in headless Chromium: sample a grid, upload an image, paint a region with the brush, get the variants;
the pixels that come back equal the library's (libs.app.logic, the calls generate_img.py makes) bit for bit.

Screenshots of both tabs go to a temporary folder, or to $KA_MIG_APP_SCREENSHOTS (tools/app_screenshots.py
sets it to docs/images/).
"""
import io
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from libs.app import logic
from libs.atomic_io import atomic_write

STATUS_TIMEOUT_MS = 60_000
CAPTION = 14  # pixels above each grid row (libs.sampling.generation.labelled_grid)


@pytest.fixture(scope="module")
def models():
    """The demo models in this process: the oracle of what the page shows."""
    return logic.load_models(logic.choose_weights("demo"))


def fetch_image(src: str) -> np.ndarray:
    """uint8 [H,W,3] of an image the page shows (its src URL)."""
    with urllib.request.urlopen(src, timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def set_number(page, elem_id: str, value):
    """Types `value` into the number box of a slider or number field and commits it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def run_and_wait(page, button: str, status: str) -> str:
    """Clicks #button and returns #status's new text once it changed."""
    box = page.locator(f"#{status} textarea")
    before = box.input_value()
    page.click(f"#{button}")
    page.wait_for_function("([id, b]) => document.querySelector(`#${id} textarea`).value !== b",
                           arg=[status, before], timeout=STATUS_TIMEOUT_MS)
    return box.input_value()


def upload(page, path) -> str:
    """Uploads a file into the Edit tab and returns the status line it gives."""
    box = page.locator("#edit_status textarea")
    before = box.input_value()
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_function("(b) => document.querySelector('#edit_status textarea').value !== b", arg=before,
                           timeout=STATUS_TIMEOUT_MS)
    return box.input_value()


def screenshot(page, name: str, tmp_path: Path):
    """Full-page PNG into $KA_MIG_APP_SCREENSHOTS (docs/images/ through tools/app_screenshots.py) or tmp_path."""
    folder = Path(os.environ.get("KA_MIG_APP_SCREENSHOTS") or tmp_path)
    data = page.screenshot(full_page=True)
    atomic_write(folder / name, lambda tmp: tmp.write_bytes(data))
    assert Image.open(folder / name).size[0] == page.viewport_size["width"]


def test_sample_a_grid_and_inpaint_a_painted_region(server, browser, models, tmp_path):
    r, f = models.resolution, logic.display_factor(models.resolution)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(server)
    page.wait_for_selector("#sample_button", timeout=STATUS_TIMEOUT_MS)

    # Sample tab: class 3 instead of 0, 3 images, 4 maskgit steps, seed 7
    page.locator("#classes label", has_text="0:").click()
    page.locator("#classes label", has_text="3:").click()
    set_number(page, "per_class", 3)
    set_number(page, "steps", 4)
    set_number(page, "seed", 7)
    status = run_and_wait(page, "sample_button", "sample_status")
    assert status == "3 images, classes [3], seed 7", status
    grid = fetch_image(page.locator("#grid img").get_attribute("src"))
    assert grid.shape == (r * f + CAPTION, 3 * r * f, 3)
    assert grid.std() > 10  # a picture, not a constant image
    tiles = np.stack([grid[CAPTION::f, k * r * f:(k + 1) * r * f:f] for k in range(3)])  # [3,R,R,3]
    settings = logic.page_settings("maskgit", None, 4, 2.0, 4.5, "linear", 1.0, "all", "confidence", 7)
    expected, _ = logic.sample_grid(models, [3], 3, settings)
    assert np.array_equal(tiles, expected)  # the page's pixels are the library's
    screenshot(page, "app_sample.png", tmp_path)

    # Edit tab: a bad upload is one line in the status, then a sample of the grid is uploaded and edited
    page.get_by_role("tab", name="Edit").click()
    (tmp_path / "notes.png").write_text("not a picture\n")
    status = upload(page, tmp_path / "notes.png")
    assert status.startswith("error: notes.png: not an image") and "\n" not in status, status
    assert "Traceback" not in page.content()
    Image.fromarray(expected[1]).save(tmp_path / "dress.png")
    assert upload(page, tmp_path / "dress.png") == "dress.png: PNG 32x32 RGB"

    page.locator("#editor button[aria-label='Brush']").click()
    canvas = page.locator("#editor canvas").first.bounding_box()
    cx, cy = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(cx - 40, cy - 20)
    page.mouse.down()
    for k in range(1, 11):  # a stroke through the middle of the image
        page.mouse.move(cx - 40 + 8 * k, cy - 20 + 4 * k)
    page.mouse.up()
    page.locator("#edit_class").click()
    page.get_by_role("option", name="6: 6_shirt").click()
    set_number(page, "variant_count", 2)
    status = run_and_wait(page, "edit_button", "edit_status")
    assert status.startswith("2 variants, ") and status.endswith("regenerated under 6: 6_shirt"), status
    variants = [fetch_image(img.get_attribute("src")) for img in page.locator("#variants img").all()]
    assert [v.shape for v in variants] == [(r * f, r * f, 3)] * 2
    edits = np.stack([v[::f, ::f] for v in variants])  # [2,R,R,3]

    # the region the page regenerated: the greyed patches of its preview (4x4-pixel tokens of the 32x32 image)
    preview = fetch_image(page.locator("#region img").get_attribute("src"))[::f, ::f]
    grid_n = int(round(np.sqrt(64)))
    patch = r // grid_n
    changed = (preview != expected[1]).any(-1).reshape(grid_n, patch, grid_n, patch).any(axis=(1, 3))  # [8,8]
    assert changed[grid_n // 2 - 1:grid_n // 2 + 1, grid_n // 2 - 1:grid_n // 2 + 1].any()  # where it was painted
    assert 0 < changed.sum() < grid_n * grid_n, changed.sum()
    assert status.startswith(f"2 variants, {int(changed.sum())} of 64 tokens")
    region = np.kron(changed, np.ones((patch, patch), dtype=bool))  # [R,R]
    result = logic.run_edit(models, expected[1], region, 6, 2, settings)
    assert np.array_equal(edits, result.edits)  # the page's edit is the library's, bit for bit
    assert not np.array_equal(edits[0], edits[1])
    screenshot(page, "app_edit.png", tmp_path)
    page.close()
