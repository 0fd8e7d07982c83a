"""The demo's pictures, drawn with PIL only (no plotting dependency): line charts with confidence bands, labelled
sample grids and the side-by-side comparison."""
import math

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def line_chart(series, title: str, xlabel: str, ylabel: str, size=(560, 380), xlog: bool = False) -> Image.Image:
    """A chart of `series`: dicts with 'label', 'x', 'y' and optionally 'lo'/'hi' (a shaded band), 'color' and
    'legend' (False: not listed). The legend sits right of the plot (the image is wider than `size` by its width).

    NaN points are skipped. xlog plots x on a log scale.
    """
    legend = [s for s in series if s.get("legend", True)]
    legend_width = 34 + 6 * max((len(str(s["label"])) for s in legend), default=0) if legend else 0
    W, H = size[0] + legend_width, size[1]
    size = (W, H)
    left, right, top, bottom = 64, 16 + legend_width, 26, 46
    img = Image.new("RGBA", size, "white")
    draw = ImageDraw.Draw(img)
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    xs = [fx(v) for s in series for v in s["x"] if v is not None and math.isfinite(v) and (v > 0 or not xlog)]
    ys = [v for s in series for key in ("y", "lo", "hi") for v in s.get(key, []) or []
          if v is not None and math.isfinite(v)]
    if not xs or not ys:
        draw.text((left, top), f"{title}: no data", fill="black")
        return img.convert("RGB")
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda v: top + (y1 - v) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            draw.line([left - 4, py(t), left, py(t)], fill="black")
            draw.line([left + 1, py(t), W - right - 1, py(t)], fill=(230, 230, 230))
            draw.text((4, py(t) - 6), _fmt(t), fill="black")
    xticks = [10 ** e for e in range(math.floor(x0), math.ceil(x1) + 1)] if xlog else nice_ticks(x0, x1)
    for t in xticks:
        if x0 - 1e-9 <= fx(t) <= x1 + 1e-9:
            draw.line([px(t), H - bottom, px(t), H - bottom + 4], fill="black")
            draw.text((px(t) - 3 * len(_fmt(t)), H - bottom + 6), _fmt(t), fill="black")
    draw.text((left, 6), title, fill="black")
    draw.text(((W - 6 * len(xlabel)) // 2, H - 18), xlabel, fill="black")
    draw.text((4, top - 20 if top >= 20 else 0), ylabel, fill=(60, 60, 60))
    band_layer = Image.new("RGBA", size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(band_layer)
    for k, s in enumerate(series):
        color = tuple(s.get("color") or PALETTE[k % len(PALETTE)])
        if s.get("lo") is not None and s.get("hi") is not None:
            pts = [(px(x), py(lo)) for x, lo in zip(s["x"], s["lo"]) if math.isfinite(lo)]
            pts += [(px(x), py(hi)) for x, hi in reversed(list(zip(s["x"], s["hi"]))) if math.isfinite(hi)]
            if len(pts) >= 3:
                band_draw.polygon(pts, fill=color + (60,))
    img = Image.alpha_composite(img, band_layer)
    draw = ImageDraw.Draw(img)
    for k, s in enumerate(series):
        color = tuple(s.get("color") or PALETTE[k % len(PALETTE)])
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        if len(pts) <= 12:
            for x, y in pts:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
    ly = top + 6
    for k, s in enumerate(series):  # legend, right of the plot
        if not s.get("legend", True):
            continue
        color = tuple(s.get("color") or PALETTE[k % len(PALETTE)])
        lx = W - right + 10
        draw.line([lx, ly + 5, lx + 16, ly + 5], fill=color, width=3)
        draw.text((lx + 20, ly), str(s["label"]), fill="black")
        ly += 15
    return img.convert("RGB")


def side_by_side(images, gap: int = 10) -> Image.Image:
    """Images pasted left to right on white, top aligned."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def stacked(images, gap: int = 10) -> Image.Image:
    """Images pasted top to bottom on white, left aligned."""
    w = max(im.width for im in images)
    h = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (w, h), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def by_class(images: np.ndarray, labels, num_classes: int, per_class: int) -> dict:
    """class -> the first `per_class` images of that class (uint8 [H,W,3] each)."""
    labels = np.asarray(labels)
    return {c: [images[i] for i in np.flatnonzero(labels == c)[:per_class]] for c in range(num_classes)}


def class_grid(columns, names, per_class: int, scale: int = 2, title_height: int = 16,
               name_width: int = 96) -> Image.Image:
    """Rows = classes (named on the left); for each (title, {class: [uint8 images]}) a block of `per_class`
    columns, upscaled `scale` times (nearest), titled on top."""
    first = next(im for _, table in columns for ims in table.values() for im in ims)
    h, w = first.shape[0] * scale, first.shape[1] * scale
    gap = 8
    width = name_width + len(columns) * (per_class * w + gap)
    canvas = Image.new("RGB", (width, title_height + len(names) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (title, table) in enumerate(columns):
        x0 = name_width + j * (per_class * w + gap)
        draw.text((x0 + 2, 2), str(title)[: max(6, per_class * w // 6)], fill="black")
        for c in range(len(names)):
            for k, im in enumerate(table.get(c, [])[:per_class]):
                canvas.paste(Image.fromarray(np.asarray(im)).resize((w, h), Image.NEAREST),
                             (x0 + k * w, title_height + c * h))
    for c, name in enumerate(names):
        draw.text((4, title_height + c * h + h // 2 - 6), str(name)[: name_width // 6], fill="black")
    return canvas
