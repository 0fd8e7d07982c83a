"""Editing: decoding only unknown tokens (inpainting / outpainting), mask arguments, generate_img.py --edit."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from configs import autonat_t8_strategy
from libs.errors import BadInput, MissingInput
from libs.sampling.decoding import generate, maskgit_schedule, remask_count, schedule_from_config
from libs.sampling.editing import parse_mask, token_mask, token_mask_pixels
from tests.helpers import randomise_fusion, tiny_ka_mig

MASK, NULL, L = 32, 4, 16
SCHEDULES = [schedule_from_config(autonat_t8_strategy.get_config()), maskgit_schedule(6, 2.0)]


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def decode(model, classes, schedule, seeds, **kw):
    return generate(model, torch.tensor(classes), schedule, seq_len=L, mask_token_id=MASK, null_class_id=NULL,
                    generator=gens(seeds), **kw)


@pytest.fixture(scope="module")
def ka_mig():
    model, _ = tiny_ka_mig()
    randomise_fusion(model)  # the graph terms depend on which tokens are known
    return model


def random_known(rows, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, L, generator=g) < p


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_known_tokens_are_kept_and_unknown_ones_decoded(ka_mig, schedule):
    init = torch.randint(0, MASK, (4, L), generator=torch.Generator().manual_seed(0))
    known = random_known(4, 1)
    out = decode(ka_mig, [0, 1, 2, 3], schedule, [5, 6, 7, 8], init_ids=init, known=known)
    assert torch.equal(out[known], init[known])
    assert not torch.any(out == MASK) and int(out.max()) < MASK
    assert not torch.equal(out, init)  # something was decoded


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_full_mask_equals_ordinary_generation(ka_mig, schedule):
    plain = decode(ka_mig, [0, 1, 3], schedule, [1, 2, 3])
    init = torch.randint(0, MASK, (3, L))  # any ids: none of them is known
    edited = decode(ka_mig, [0, 1, 3], schedule, [1, 2, 3], init_ids=init, known=torch.zeros(3, L, dtype=torch.bool))
    assert torch.equal(edited, plain)
    all_mask = decode(ka_mig, [0, 1, 3], schedule, [1, 2, 3], init_ids=torch.full((3, L), MASK))  # known inferred
    assert torch.equal(all_mask, plain)
    one = torch.Generator().manual_seed(9)  # one generator for the batch, too
    a = generate(ka_mig, torch.tensor([2, 2]), schedule, seq_len=L, mask_token_id=MASK, null_class_id=NULL,
                 generator=torch.Generator().manual_seed(9))
    b = generate(ka_mig, torch.tensor([2, 2]), schedule, seq_len=L, mask_token_id=MASK, null_class_id=NULL,
                 generator=one, init_ids=torch.full((2, L), MASK))
    assert torch.equal(a, b)


def test_mask_covering_nothing_returns_the_input_tokens(ka_mig):
    init = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(3))
    record = []
    out = decode(ka_mig, [1, 2], SCHEDULES[1], [0, 1], init_ids=init, known=torch.ones(2, L, dtype=torch.bool),
                 record=record)
    assert torch.equal(out, init)
    assert all(torch.equal(step, init) for step in record)  # never re-masked on the way


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_batch_of_different_masks_equals_each_alone_and_counts_follow_the_unknown(ka_mig, schedule):
    init = torch.randint(0, MASK, (4, L), generator=torch.Generator().manual_seed(4))
    known = torch.zeros(4, L, dtype=torch.bool)
    known[0, :3] = True     # 13 unknown
    known[1, ::2] = True    # 8 unknown
    known[2, 1:] = True     # 1 unknown
    known[3] = True         # nothing unknown
    record = []
    out = decode(ka_mig, [0, 1, 2, 3], schedule, [10, 11, 12, 13], init_ids=init, known=known, record=record)
    for i in range(4):
        alone = decode(ka_mig, [i], schedule, [10 + i], init_ids=init[i:i + 1], known=known[i:i + 1])
        assert torch.equal(out[i], alone[0]), i
    assert torch.equal(out[3], init[3]) and torch.equal(out[known], init[known])
    n_unknown = (~known).sum(1).tolist()
    masked = list(n_unknown)
    for t, step in enumerate(record[:-1]):  # [MASK] left after each step, per sample
        want = []
        for i, n in enumerate(n_unknown):
            if n == 0:
                want.append(0)
                continue
            masked[i] = max(1, min(masked[i] - 1, remask_count(n, schedule.ratios[t], schedule.ratio_dtype)))
            want.append(masked[i])
        assert (step == MASK).sum(1).tolist() == want, t
    assert not torch.any(record[-1] == MASK)


def test_bad_init_ids_are_refused(ka_mig):
    with pytest.raises(ValueError, match="known token ids"):
        decode(ka_mig, [0], SCHEDULES[1], [0], init_ids=torch.full((1, L), 40),
               known=torch.ones(1, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="init_ids must be"):
        decode(ka_mig, [0], SCHEDULES[1], [0], init_ids=torch.zeros(1, L + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- masks


def test_box_outside_and_png_masks(tmp_path):
    mask, record = parse_mask("2,1,5,3", 8)
    assert record == {"kind": "box", "box": [2, 1, 5, 3]}
    assert mask.sum() == 3 * 2 and mask[1, 2] and mask[2, 4] and not mask[3, 4] and not mask[1, 5]
    outside, record = parse_mask("outside:2,1,5,3", 8)
    assert record["kind"] == "outside" and np.array_equal(outside, ~mask)
    img = np.zeros((8, 8, 3), np.uint8)
    img[0, 7] = 255
    img[5, 5] = 200  # mean >= 128: white
    img[6, 6] = (255, 0, 0)  # mean 85: black
    Image.fromarray(img).save(tmp_path / "m.png")
    png, record = parse_mask(str(tmp_path / "m.png"), 8)
    assert record["kind"] == "png" and len(record["sha256"]) == 64
    assert png.sum() == 2 and png[0, 7] and png[5, 5]


def test_a_token_is_unknown_when_any_pixel_of_its_patch_is_masked():
    mask = np.zeros((8, 8), bool)
    mask[3, 4] = True  # one pixel: patch row 1, column 2 of a 4x4 grid of 2x2 patches
    unknown = token_mask(mask, 4)
    assert unknown.tolist() == [i == 1 * 4 + 2 for i in range(16)]
    assert token_mask_pixels(unknown, 8).sum() == 4 and token_mask_pixels(unknown, 8)[2:4, 4:6].all()
    box, _ = parse_mask("2,2,5,5", 8)
    assert np.flatnonzero(token_mask(box, 4)).tolist() == [5, 6, 9, 10]


@pytest.mark.parametrize("mask_arg, match", [
    ("5,1,5,3", "x0 < x1"), ("1,4,3,2", "y0 < y1"), ("0,0,9,4", "outside the preprocessed 8x8"),
    ("-1,0,4,4", "outside the preprocessed"), ("outside:0,0,8,8", "selects no pixel"), ("1,2,3", "four integers"),
    ("outside:a,b", "four integers")])
def test_bad_boxes_are_refused(mask_arg, match):
    with pytest.raises(BadInput, match=match):
        parse_mask(mask_arg, 8)


def test_bad_mask_files_are_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInput, match="empty file"):
        parse_mask(str(tmp_path / "empty.png"), 8)
    Image.fromarray(np.full((6, 8, 3), 255, np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(BadInput, match="mask image is 8x6, the preprocessed image is 8x8"):
        parse_mask(str(tmp_path / "small.png"), 8)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(BadInput, match="selects no pixel"):
        parse_mask(str(tmp_path / "black.png"), 8)
    with pytest.raises(MissingInput, match="no such mask file"):
        parse_mask(str(tmp_path / "absent.png"), 8)


# ----------------------------------------------------------------------------- generate_img.py --edit


@pytest.fixture
def photo(tmp_path):
    """A 12x10 RGB PNG: centre-cropped to 8x8 by the tiny tokenizer's preprocessing."""
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_img_edit_end_to_end(tiny_assets, tmp_path, photo, monkeypatch):
    import generate_img
    from libs.data.images import load_image_file
    from libs.models.factory import load_tokenizer
    root, overrides = tiny_assets
    seen = []
    real = generate_img.sample_images

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)
    monkeypatch.setattr(generate_img, "sample_images", spy)
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--edit", str(photo), "--mask", "2,2,5,5", "--class", "3",
            "--per-class", "3", "--batch-size", "2", "--out", str(tmp_path / "out"), "--device", "cpu", *overrides]
    run_dir = generate_img.main(args)
    assert run_dir.name.startswith("edit_ka_mig_seed0_")
    edits = sorted(run_dir.glob("*_edit_class3.png"))
    assert [p.name for p in edits] == [f"{i:05d}_edit_class3.png" for i in range(3)]
    assert all(np.asarray(Image.open(p)).shape == (8, 8, 3) for p in edits)
    preprocessed = load_image_file(photo, 8)
    assert np.array_equal(np.asarray(Image.open(run_dir / "input.png")), preprocessed)
    mask = np.asarray(Image.open(run_dir / "mask.png"))[..., 0] > 0
    assert mask.sum() == 9 and mask[2:5, 2:5].all()
    assert (np.asarray(Image.open(run_dir / "mask_tokens.png"))[..., 0] > 0).sum() == 16  # 4 patches of 2x2
    assert Image.open(run_dir / "strip.png").size == (5 * 8 + 4 * 2, 8)  # input, masked input, 3 edits
    # the decoder got the image's tokens, with exactly the tokens under the mask unknown
    tokenizer = load_tokenizer(generate_img.parse_args_with_config(generate_img.build_parser(), "configs/tiny.py",
                                                                   overrides)[1].tokenizer)
    ids = tokenizer.encode(torch.from_numpy(preprocessed).permute(2, 0, 1)[None].float() / 255).flatten(1)[0]
    assert len(seen) == 2  # batches of 2 + 1
    for k in seen:
        assert torch.equal(k["init_ids"][0], ids)
        assert np.flatnonzero(~k["known"][0].numpy()).tolist() == [5, 6, 9, 10]
    fp = json.loads((run_dir / "fingerprint.json").read_text())["fingerprint"]
    assert fp["edit"]["mask"] == {"kind": "box", "box": [2, 2, 5, 5]} and fp["edit"]["class"] == 3
    assert len(fp["edit"]["image_sha256"]) == 64 and fp["labels"]["mode"] == "edit"
    first = {p.name: p.read_bytes() for p in edits}
    seen.clear()
    assert generate_img.main(args) == run_dir and not seen  # same command: the same folder, nothing resampled
    again = generate_img.main(args + ["--overwrite"])  # resampled from scratch: the same bytes
    assert {p.name: p.read_bytes() for p in sorted(again.glob("*_edit_class3.png"))} == first
    other = generate_img.main([a if a != "2,2,5,5" else "outside:2,2,5,5" for a in args])
    assert other != run_dir  # another mask, another fingerprint


def test_generate_img_edit_input_errors(tiny_assets, tmp_path, photo):
    import generate_img
    root, overrides = tiny_assets
    base = ["--checkpoint", str(root / "ka_mig.pth"), "--out", str(tmp_path / "out"), "--device", "cpu", *overrides]
    with pytest.raises(BadInput, match="--edit needs --class"):
        generate_img.main(base + ["--edit", str(photo), "--mask", "0,0,4,4"])
    with pytest.raises(BadInput, match="--edit needs --mask"):
        generate_img.main(base + ["--edit", str(photo), "--class", "1"])
    with pytest.raises(BadInput, match="editing flag"):
        generate_img.main(base + ["--mask", "0,0,4,4"])
    with pytest.raises(BadInput, match="outside the preprocessed 8x8"):
        generate_img.main(base + ["--edit", str(photo), "--mask", "0,0,4,12", "--class", "1"])
    with pytest.raises(BadInput, match="outside"):
        generate_img.main(base + ["--edit", str(photo), "--mask", "0,0,4,4", "--class", "7"])
    with pytest.raises(MissingInput, match="no such image"):
        generate_img.main(base + ["--edit", str(tmp_path / "nope.png"), "--mask", "0,0,4,4", "--class", "1"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
