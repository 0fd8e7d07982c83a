"""What the demo reports: NLL and FID summaries with intervals, figures, metrics.json and summary.txt."""
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from demo import figures
from libs.atomic_io import atomic_write, atomic_write_text
from libs.data.images import list_image_folder, read_rgb
from libs.evaluation.nll import paired_difference, t_interval
from libs.models.factory import GRAPH_KINDS

# (a, b): the paired differences a - b the demo reports, when both models are present
DEMO_PAIRS = (("ka_mig", "control"), ("ka_mig", "backbone"), ("control", "backbone"), ("ka_mig", "shuffled"))


# ----------------------------------------------------------------------------- numbers


def loss_start_end(log: list, k: int = 3) -> dict:
    """Mean training loss of the first and of the last k logged steps (single-batch losses are noisy)."""
    losses = [row["loss"] for row in log if "loss" in row]
    if not losses:
        return {"loss_start": None, "loss_end": None, "loss_rows_averaged": 0}
    k = min(k, len(losses))
    return {"loss_start": float(np.mean(losses[:k])), "loss_end": float(np.mean(losses[-k:])), "loss_rows_averaged": k}


def nll_summary(npz_path, level: float = 0.95, pairs=DEMO_PAIRS) -> dict:
    """Per model: mean held-out NLL over images (of the per-image mean over ratios) and per ratio, with t intervals;
    per pair (a, b) present: the same for the per-image differences a - b."""
    with np.load(npz_path, allow_pickle=False) as z:
        names, nll, ratios = [str(n) for n in z["names"]], z["nll"], z["ratios"].tolist()  # nll [M,N,R]
        n_images, seed = int(nll.shape[1]), int(z["seed"])
    by_name = dict(zip(names, nll))
    out = {"ratios": ratios, "n_images": n_images, "mask_seed": seed, "level": level,
           "interval": "Student t over per-image values (paired per-image differences for the differences)",
           "models": {}, "differences": {}}
    for name, v in by_name.items():
        out["models"][name] = {"overall": t_interval(v.mean(1), level),
                               "per_ratio": [t_interval(v[:, j], level) for j in range(len(ratios))]}
    for a, b in pairs:
        if a in by_name and b in by_name:
            va, vb = by_name[a], by_name[b]
            out["differences"][f"{a}-{b}"] = {
                "overall": paired_difference(va.mean(1), vb.mean(1), level),
                "per_ratio": [paired_difference(va[:, j], vb[:, j], level) for j in range(len(ratios))]}
    return out


def num(x: float, digits: int = 4, signed: bool = True) -> str:
    """x with `digits` decimals, or in scientific notation when that would show only zeros."""
    if x != 0 and abs(x) < 0.5 * 10 ** -digits:
        return f"{x:{'+' if signed else ''}.1e}"
    return f"{x:{'+' if signed else ''}.{digits}f}"


def verdict(diff: dict, a: str, b: str, unit: str, lower_is_better: bool = True) -> str:
    """One sentence: is a better than b beyond the interval, by how much."""
    mean, lo, hi = diff["mean"] if "mean" in diff else diff["diff"], diff["lo"], diff["hi"]
    digits = 4 if unit == "nats" else 2
    span = f"{num(mean, digits)} {unit} [{num(lo, digits)}, {num(hi, digits)}]"
    better = (hi < 0) if lower_is_better else (lo > 0)
    worse = (lo > 0) if lower_is_better else (hi < 0)
    if better:
        return f"{a} is better than {b} beyond the noise: {a} - {b} = {span}"
    if worse:
        return f"{a} is WORSE than {b} beyond the noise: {a} - {b} = {span}"
    return f"{a} is NOT distinguishable from {b}: {a} - {b} = {span} includes 0"


# ----------------------------------------------------------------------------- figures


def read_curve(path) -> list:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def save_png(image: Image.Image, path):
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def curve_figure(curve_csv, train_log_csv, out_png):
    """The backbone's held-out NLL (raw and EMA weights, with intervals) and training loss against the step."""
    rows = read_curve(curve_csv)
    steps = [r["step"] for r in rows]
    series = [{"label": "held-out NLL, EMA", "x": steps, "y": [r["ema_nll"] for r in rows],
               "lo": [r["ema_lo"] for r in rows], "hi": [r["ema_hi"] for r in rows]},
              {"label": "held-out NLL, raw", "x": steps, "y": [r["raw_nll"] for r in rows],
               "lo": [r["raw_lo"] for r in rows], "hi": [r["raw_hi"] for r in rows]}]
    log = []
    if Path(train_log_csv).is_file():
        with open(train_log_csv) as f:
            log = [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    left = figures.line_chart(series, "demo backbone: held-out masked-token NLL (mean over mask ratios)",
                              "training step", "nats")
    right = figures.line_chart([{"label": "train loss (smoothing 0.1)", "x": [s for s, _ in log],
                                 "y": [v for _, v in log]}], "demo backbone: training loss", "training step", "nats")
    save_png(figures.side_by_side([left, right]), out_png)


def demo_figures(out: Path, p: dict, entries: list, nll: dict, train_logs: dict, class_names: list, d):
    """grid_<model>.png for every model, comparison.png (held-out | each model) and curves.png."""
    C = len(class_names)
    samples = {}
    for e in entries:
        with np.load(out / "samples" / e["name"] / "samples.npz", allow_pickle=False) as z:
            samples[e["name"]] = figures.by_class(z["arr_0"], z["labels"], C, d.grid_per_class)
    grids = {}
    for e in entries:
        img = figures.class_grid([(f"{e['label']} samples", samples[e["name"]])], class_names, d.grid_per_class)
        grids[e["name"]] = save_png(img, out / f"grid_{e['name']}.png")
    heldout = Path(p["heldout_images"])
    _, items = list_image_folder(heldout)
    real = {c: [read_rgb(heldout / rel) for rel, lab in items if lab == c][: d.grid_per_class] for c in range(C)}
    per = min(4, d.grid_per_class)
    columns = [("held-out", real)] + [(e["label"], samples[e["name"]]) for e in entries]
    comparison = save_png(figures.class_grid(columns, class_names, per), out / "comparison.png")
    # curves.png: NLL vs mask ratio, paired differences vs ratio, training losses
    ratios = nll["ratios"]
    label = {e["name"]: e["label"] for e in entries}
    # one colour per model in every panel; the differences take the colours after the models'
    color = {e["name"]: figures.PALETTE[i % len(figures.PALETTE)] for i, e in enumerate(entries)}
    s1 = [{"label": label[n], "x": ratios, "y": [c["mean"] for c in m["per_ratio"]], "color": color.get(n),
           "lo": [c["lo"] for c in m["per_ratio"]], "hi": [c["hi"] for c in m["per_ratio"]]}
          for n, m in nll["models"].items()]
    s2 = [{"label": " - ".join(label.get(n, n) for n in k.split("-")), "x": ratios,
           "y": [c["mean"] for c in v["per_ratio"]],
           "color": figures.PALETTE[(len(entries) + j) % len(figures.PALETTE)],
           "lo": [c["lo"] for c in v["per_ratio"]], "hi": [c["hi"] for c in v["per_ratio"]]}
          for j, (k, v) in enumerate(nll["differences"].items())]
    s2.append({"label": "0", "x": [ratios[0], ratios[-1]], "y": [0.0, 0.0], "color": (0, 0, 0), "legend": False})
    s3 = [{"label": label.get(n, n), "x": [r["step"] for r in log], "y": [r["loss"] for r in log],
           "color": color.get(n)} for n, log in train_logs.items() if log]
    level = int(round(100 * nll["level"]))
    panels = [figures.line_chart(s1, f"held-out NLL vs mask ratio ({level}% CI bands, {nll['n_images']} images)",
                                 "mask ratio", "nats"),
              figures.line_chart(s2, f"paired NLL differences ({level}% CI)", "mask ratio", "nats"),
              figures.line_chart(s3, "training loss (label smoothing 0.1)", "step", "nats")]
    curves = save_png(figures.side_by_side(panels), out / "curves.png")
    return {"grids": {k: str(v) for k, v in grids.items()}, "comparison": str(comparison), "curves": str(curves)}


# ----------------------------------------------------------------------------- make demo


def demo_report(config, config_file, overrides, out: Path, p: dict, entries: list, runner, threads, why,
                t_start) -> dict:
    """metrics.json, summary.txt and the figures of a demo run; returns the metrics."""
    from demo.pipeline import host_name, read_train_log, write_json
    d = config.demo
    nll = nll_summary(out / "nll.npz", d.ci_level)
    fid = json.loads((out / "fid.json").read_text())
    train_logs = {e["name"]: read_train_log(out / "runs" / e["name"] / "log.csv") for e in entries
                  if e["kind"] in GRAPH_KINDS}
    class_names, _ = list_image_folder(p["heldout_images"])
    outputs = demo_figures(out, p, entries, nll, train_logs, class_names, d)
    metrics = {
        "source": d.source,
        "host": host_name(config),
        "models": {e["name"]: {"label": e["label"], "kind": e["kind"], "checkpoint": e["checkpoint"],
                               "overrides": e["overrides"]} for e in entries},
        "nll": nll,
        "fid": fid,
        "train": {"steps": int(config.train.n_steps), "batch_size": int(config.train.batch_size),
                  "lr": float(config.train.lr), "seed": int(config.seed),
                  "runs": {n: {**loss_start_end(log), "log": str(out / "runs" / n / "log.csv")}
                           for n, log in train_logs.items()}},
        "data": {"root": str(Path(p["heldout_images"]).parent), "train_per_class": int(d.train_per_class),
                 "heldout_split": d.heldout_split, "heldout_per_class": int(d.heldout_per_class)},
        "stage_seconds": dict(runner.seconds),
        "total_seconds": round(time.time() - t_start, 2),
        "threads": threads, "threads_reason": why,
        "config": str(config_file), "overrides": [f"--config.{k}={v}" for k, v in overrides],
        "outputs": {**outputs, "logs": str(p["logs"])},
    }
    metrics["verdicts"] = verdicts(metrics)
    write_json(out / "metrics.json", metrics)
    text = summary_text(metrics, out)
    atomic_write_text(out / "summary.txt", text)
    print("\n" + text, flush=True)
    return metrics


def verdicts(m: dict) -> dict:
    """Sentences for every reported difference (NLL and FID), as measured."""
    out = {}
    labels = {n: v["label"] for n, v in m["models"].items()}
    for key, v in m["nll"]["differences"].items():
        a, b = key.split("-")
        out[f"nll {key}"] = verdict(v["overall"], labels[a], labels[b], "nats")
        out[f"nll {key} beyond noise"] = bool(v["overall"]["hi"] < 0)
    for a, b in DEMO_PAIRS:
        v = fid_difference(m["fid"], a, b)
        if v is not None:
            out[f"fid {a}-{b}"] = verdict(v, labels[a], labels[b], "FID")
            out[f"fid {a}-{b} beyond noise"] = bool(v["hi"] < 0)
    return out


def fid_difference(fid: dict, a: str, b: str):
    """FID(a) - FID(b) with its interval from fid.json's differences (stored for either order), or None."""
    diffs = fid["differences"]
    if f"{a}-{b}" in diffs:
        return diffs[f"{a}-{b}"]
    if f"{b}-{a}" in diffs:
        v = diffs[f"{b}-{a}"]
        return {**v, "diff": -v["diff"], "lo": -v["hi"], "hi": -v["lo"]}
    return None


def tracker_scalars(nll: dict, fid: dict) -> dict:
    """The headline numbers for --log-with: nll/<model> and nll_diff/<a>-<b> (overall means, nats), fid/<model>
    and fid_diff/<a>-<b> (the differences fid.json holds)."""
    values = {f"nll/{n}": v["overall"]["mean"] for n, v in nll["models"].items()}
    values.update({f"nll_diff/{k}": v["overall"]["mean"] for k, v in nll["differences"].items()})
    values.update({f"fid/{n}": v["fid"] for n, v in fid["models"].items()})
    values.update({f"fid_diff/{k}": v["diff"] for k, v in fid["differences"].items()})
    return values


def log_demo(kind: str, metrics: dict):
    """Sends a finished demo's figures (grid_<model>.png, comparison.png, curves.png) and headline numbers to the
    --log-with tracker, in the folder of its metrics.json (step 0)."""
    from libs.training.tracking import log_run
    o = metrics["outputs"]
    images = {"comparison": o["comparison"], "curves": o["curves"], **{f"grid/{n}": p for n, p in o["grids"].items()}}
    log_run(kind, Path(o["comparison"]).parent, "demo", [(0, tracker_scalars(metrics["nll"], metrics["fid"]))],
            images)


def summary_text(m: dict, out: Path) -> str:
    """The closing summary of a demo run: every figure with its interval, and what they say."""
    nll, fid = m["nll"], m["fid"]
    level = int(round(100 * nll["level"]))
    labels = {n: v["label"] for n, v in m["models"].items()}
    host = m.get("host", "KA-MIG")
    lines = ["=" * 100, f"{host} CPU demo ({m['source']}): summary", "",
             f"Held-out masked-token NLL (nats; lower is better) on {nll['n_images']} held-out images, mask ratios "
             f"{', '.join(f'{r:g}' for r in nll['ratios'])} (fixed seeded masks, the same for every model); "
             f"{level}% t intervals over images:"]
    head = f"  {'model':<30}{'overall':>28}" + "".join(f"{f'r={r:g}':>12}" for r in nll["ratios"])
    lines.append(head)
    for name, v in nll["models"].items():
        o = v["overall"]
        lines.append(f"  {labels[name]:<30}{o['mean']:>10.4f} [{o['lo']:.4f}, {o['hi']:.4f}]"
                     + "".join(f"{c['mean']:>12.4f}" for c in v["per_ratio"]))
    lines.append("  paired differences (per-image, same masks):")
    for key, v in nll["differences"].items():
        a, b = key.split("-")
        o = v["overall"]
        lines.append(f"  {labels[a] + ' - ' + labels[b]:<46}{num(o['mean']):>10} [{num(o['lo'])}, {num(o['hi'])}]"
                     + "  per ratio " + " ".join(num(c["mean"]) for c in v["per_ratio"]))
    sp = fid["spread"]
    lines += ["", f"FID (lower is better), {fid['n_samples']} samples per model (same labels and seeds) against "
                  f"{fid['n_reference']} held-out images ({fid['reference']['features']}); {level}% interval = "
                  f"FID +- {sp['z']:.2f} SD, SD from {sp['subsets']} random halves (delete-half jackknife):"]
    for name, v in fid["models"].items():
        lines.append(f"  {labels[name]:<30}FID {v['fid']:8.2f} [{v['lo']:.2f}, {v['hi']:.2f}]   "
                     f"precision {v['precision']:.3f}  recall {v['recall']:.3f}")
    for a, b in DEMO_PAIRS:
        v = fid_difference(fid, a, b)
        if v is not None:
            lines.append(f"  {labels[a] + ' - ' + labels[b]:<46}{v['diff']:>+8.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]")
    lines += ["", "As measured on this run:"]
    for key, sentence in m["verdicts"].items():
        if not key.endswith("beyond noise"):
            lines.append(f"  - {sentence}")
    lines += ["  The intervals cover the held-out images and masks (NLL) and the samples (FID) of these trained weights;",
              "  they do not cover training randomness (one training seed per model): `make ablation` trains the",
              "  control and KA-MIG with a second seed, and a shuffled-graph control of the same size."]
    runs = m["train"]["runs"]
    lines += ["", f"Training (control and {host} alike): {m['train']['steps']} steps of {m['train']['batch_size']}, "
                  f"lr {m['train']['lr']:g}, seed {m['train']['seed']}; loss (first -> last 3 logged steps): "
                  + "; ".join(f"{labels[n]} {fmt(r['loss_start'])} -> {fmt(r['loss_end'])}" for n, r in runs.items())]
    times = ", ".join(f"{k} {v:.0f}s" for k, v in m["stage_seconds"].items())
    lines += [f"Time: {m['total_seconds']:.0f} s in all ({times}); {m['threads']} thread(s) per stage",
              f"Outputs in {out}: grid_<model>.png, comparison.png, curves.png, metrics.json, nll.npz, fid.json, logs/",
              "=" * 100]
    return "\n".join(lines) + "\n"


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
