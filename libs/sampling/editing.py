"""Image editing with a masked-token model: inpainting, outpainting and class-conditional editing.

An image is preprocessed exactly as for tokenization (ADM centre crop to the tokenizer's resolution R,
`libs.data.images.load_image_file`) and tokenized; a pixel mask over that R x R image says what to regenerate.
A token is unknown (regenerated) when **any** pixel of its patch (R/grid pixels square) is masked, so the
regenerated region covers the mask, rounded outwards to whole patches. Decoding
(`libs.sampling.decoding.generate` with `init_ids` / `known`) keeps every other token as it is, and the
schedule counts the unknown tokens only. The tokens are then decoded to pixels as a whole (the tokenizer's
decoder sees every token, so pixels near the region can change slightly even where the tokens did not).

Mask arguments (`parse_mask`), in the preprocessed image's pixel coordinates, x to the right, y down:

    x0,y0,x1,y1            regenerate the box x0 <= x < x1, y0 <= y < y1 (inpainting)
    outside:x0,y0,x1,y1    regenerate everything but that box (outpainting)
    <file>.png             a mask image of size R x R: white (mean of R, G, B >= 128) = regenerate

Boxes must lie in the image (0 <= x0 < x1 <= R, 0 <= y0 < y1 <= R) and a mask must select at least one
pixel; anything else is a BadInput naming the problem.
"""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from libs.checkpoint import file_sha256
from libs.data.images import UnreadableImage, load_image_file, read_rgb
from libs.errors import BadInput, MissingInput

BOX = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")
OUTSIDE = "outside:"


def _box(text: str, mask_arg: str, size: int):
    """(x0, y0, x1, y1) of a box argument inside a size x size image, else BadInput."""
    m = BOX.match(text)
    if not m:
        raise BadInput(f"--mask '{mask_arg}': a box is four integers x0,y0,x1,y1 (pixels of the preprocessed "
                       f"{size}x{size} image), 'outside:x0,y0,x1,y1', or a mask .png")
    x0, y0, x1, y1 = (int(v) for v in m.groups())
    if x0 >= x1 or y0 >= y1:
        raise BadInput(f"--mask '{mask_arg}': empty box, need x0 < x1 and y0 < y1 (got x0={x0}, x1={x1}, y0={y0}, "
                       f"y1={y1})")
    if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
        raise BadInput(f"--mask '{mask_arg}': box outside the preprocessed {size}x{size} image (need 0 <= x0 < x1 <= "
                       f"{size} and 0 <= y0 < y1 <= {size}, x1/y1 exclusive)")
    return x0, y0, x1, y1


def parse_mask(mask_arg: str, size: int):
    """(pixel mask bool [size,size], True = regenerate; a JSON-able description for the fingerprint).

    See the module docstring for the accepted forms. Raises BadInput (malformed argument, box outside the image,
    x0 >= x1, mask image of another size, unreadable or empty file, a mask that selects no pixel) or
    MissingInput (mask file not found).
    """
    mask_arg = str(mask_arg)
    mask = np.zeros((size, size), dtype=bool)
    if mask_arg.startswith(OUTSIDE):
        x0, y0, x1, y1 = _box(mask_arg[len(OUTSIDE):], mask_arg, size)
        mask[:] = True
        mask[y0:y1, x0:x1] = False
        record = {"kind": "outside", "box": [x0, y0, x1, y1]}
    elif re.fullmatch(r"[\s\d,+-]+", mask_arg):  # numbers only: meant as a box
        x0, y0, x1, y1 = _box(mask_arg, mask_arg, size)
        mask[y0:y1, x0:x1] = True
        record = {"kind": "box", "box": [x0, y0, x1, y1]}
    else:
        path = Path(mask_arg)
        if not path.exists():
            raise MissingInput(f"--mask {mask_arg}: no such mask file (a box is x0,y0,x1,y1 or outside:x0,y0,x1,y1)")
        try:
            rgb = read_rgb(path)  # [H,W,3] uint8 (any mode, alpha dropped)
        except UnreadableImage as e:
            raise BadInput(f"--mask {mask_arg}: unreadable mask image ({e.reason})") from e
        if rgb.shape[:2] != (size, size):
            raise BadInput(f"--mask {mask_arg}: mask image is {rgb.shape[1]}x{rgb.shape[0]}, the preprocessed image is "
                           f"{size}x{size} (white = regenerate)")
        mask = rgb.astype(np.float32).mean(-1) >= 128
        record = {"kind": "png", "sha256": file_sha256(path)}
    if not mask.any():
        raise BadInput(f"--mask '{mask_arg}': the mask selects no pixel, so nothing would be regenerated "
                       "(white = regenerate in a mask image)")
    return mask, record


def token_mask(pixel_mask: np.ndarray, grid: int) -> np.ndarray:
    """bool [grid*grid] (row-major tokens): True where any pixel of the token's patch is masked."""
    size = pixel_mask.shape[0]
    if pixel_mask.shape != (size, size) or size % grid:
        raise BadInput(f"a {pixel_mask.shape} mask does not split into {grid}x{grid} equal patches")
    patch = size // grid
    return pixel_mask.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1)


def token_mask_pixels(unknown: np.ndarray, size: int) -> np.ndarray:
    """The pixels of the unknown tokens, bool [size,size] (what is actually regenerated)."""
    grid = int(round(len(unknown) ** 0.5))
    patch = size // grid
    return np.kron(unknown.reshape(grid, grid), np.ones((patch, patch), dtype=bool)).astype(bool)


def load_edit_image(path, resolution: int) -> np.ndarray:
    """uint8 [R,R,3]: the image file preprocessed as for tokenization; MissingInput / BadInput if it cannot."""
    if not Path(path).exists():
        raise MissingInput(f"--edit {path}: no such image file")
    return load_image_file(path, resolution)  # UnreadableImage (a BadInput) names the file and the reason


@torch.no_grad()
def encode_image(tokenizer, image: np.ndarray, device) -> torch.Tensor:
    """uint8 [R,R,3] -> token ids [L] long, as the tokenizer run encodes it (x / 255, no flip)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device).float() / 255.0
    return tokenizer.encode(x).flatten(1)[0].long()  # [L]


def masked_preview(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3]: the image with the regenerated region greyed out (shown in the strip)."""
    out = image.copy()
    out[region] = (out[region].astype(np.uint16) // 4 + 96).astype(np.uint8)
    return out


def edit_strip(image: np.ndarray, region: np.ndarray, edits: np.ndarray, gap: int = 2) -> Image.Image:
    """Side-by-side PNG: input | input with the regenerated region greyed | the edits, `gap` white pixels apart."""
    tiles = [image, masked_preview(image, region), *edits]
    h, w, _ = image.shape
    strip = Image.new("RGB", (len(tiles) * w + (len(tiles) - 1) * gap, h), "white")
    for k, tile in enumerate(tiles):
        strip.paste(Image.fromarray(tile), (k * (w + gap), 0))
    return strip


def mask_png(mask: np.ndarray) -> np.ndarray:
    """bool [H,W] -> uint8 [H,W,3], white = regenerate."""
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
