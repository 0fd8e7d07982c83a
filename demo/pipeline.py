"""The CPU demo: runs the repo's real entry points as subprocesses, times each stage, writes metrics.

`run_demo` (make demo): data -> tokens -> graphs -> KA-MIG training on the frozen demo backbone -> labelled
grids -> FID reference statistics of held-out images -> samples + FID of KA-MIG and of the bare backbone.
`build_assets` (make demo-assets): data -> tokenizer training -> tokens -> backbone pretraining -> demo/assets/.
Every stage is a subprocess `python <script> --config <file> <overrides>`, its output is shown live (progress
bars included) and saved under <out>/logs/.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from libs.atomic_io import atomic_write, atomic_write_json, atomic_write_text
from libs.checkpoint import file_sha256
from libs.config import apply_override, load_config_file, split_overrides
from libs.data.images import list_image_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILE = "vqgan_demo.pth"
BACKBONE_FILE = "autonat_demo.pth"
MANIFEST_FILE = "manifest.json"
# what run_demo writes into its output folder (removed at the start of a run, nothing else is touched)
DEMO_OUTPUTS = ("logs", "tokens", "graphs", "ka_mig", "grid_runs", "fid_ka_mig", "fid_backbone", "fid_ref_val.npz",
                "grid_ka_mig.png", "grid_backbone.png", "comparison.png", "metrics.json", "summary.txt")
ASSET_OUTPUTS = ("logs", "tokens", "backbone", "tokenizer.pth", "tokenizer.pth.json")


class StageFailed(RuntimeError):
    """A pipeline stage exited with a non-zero status."""


def parse_demo_args(parser, argv=None):
    """Adds the demo drivers' shared --threads flag and parses argv; -> (args, --config.<key>=<value> overrides)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage (default 0: all cores, or 1 on an already busy machine)")
    overrides, rest = split_overrides(sys.argv[1:] if argv is None else list(argv))
    return parser.parse_args(rest), overrides


def pick_threads(requested: int = 0) -> tuple:
    """(threads, reason): `requested` if > 0; else all cores, or 1 when the machine is already busy.

    On a busy CPU the per-op thread hand-off of a second torch thread costs more than it gains for these
    small models (we measured 6x slower tokenizer steps with 2 threads than with 1 at load ~5 on 2 cores).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        return requested, "as asked (--threads)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores / 2:
        return 1, f"auto: load average {load:.1f} on {cores} cores, so 1 thread per stage"
    return cores, f"auto: load average {load:.1f} on {cores} cores"


class Runner:
    """Runs stages as subprocesses in the repo root, tees their output to the terminal and a log, times them."""

    def __init__(self, log_dir: Path, threads: int, total_stages: int):
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.total = total_stages
        self.seconds = {}
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        PYTHONUNBUFFERED="1")

    def run(self, name: str, args: list, what: str):
        """Runs `python <args>`; raises StageFailed on a non-zero exit. Returns the wall seconds."""
        n = len(self.seconds) + 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{n:02d}_{name}.log"
        shown = " ".join(_quote(a) for a in ["python", *args])
        print(f"\n=== [{n}/{self.total}] {name}: {what}\n$ {shown}", flush=True)
        t0 = time.time()
        with open(log_path, "wb") as log:
            log.write(f"$ {shown}\n".encode())
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                fd = proc.stdout.fileno()
                while True:
                    chunk = os.read(fd, 4096)  # raw bytes: keeps the progress bars' carriage returns
                    if not chunk:
                        break
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                    log.write(chunk)
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        seconds = time.time() - t0
        self.seconds[name] = round(seconds, 2)
        if rc != 0:
            raise StageFailed(f"stage '{name}' failed with exit status {rc} after {seconds:.0f} s; "
                              f"its output is in {log_path}")
        print(f"--- {name} done in {seconds:.1f} s", flush=True)
        return seconds


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=./:," for c in arg) else repr(arg)


def resolve(path) -> Path:
    """A user path relative to the current directory; a config path relative to the repo root."""
    path = Path(path)
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def shown_path(path) -> str:
    """`path` relative to the repo root when inside it (what manifests record), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def config_path(path) -> Path:
    """A config file given relative to the current directory or to the repo root, made absolute."""
    path = Path(path)
    if path.is_absolute() or path.is_file():
        return path.resolve()
    return repo_path(path)


def repo_path(path) -> Path:
    """A config path (relative to the repo root) made absolute."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def load_demo_config(config_file, overrides):
    """The driver's own view of the config, with the same `--config.x=v` overrides the stages get."""
    config = load_config_file(config_file)
    for key, value in overrides:
        apply_override(config, key, value)
    return config


def clean_outputs(out: Path, names):
    """Removes what an earlier run of this driver wrote into `out` (only the known names)."""
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------- make demo


def demo_paths(out: Path, assets: Path) -> dict:
    """Every file and folder run_demo reads or writes."""
    return {"tokens": out / "tokens" / "train", "graphs": out / "graphs", "ka_mig": out / "ka_mig" / "model_ema.pth",
            "train_log": out / "ka_mig" / "log.csv", "grid_runs": out / "grid_runs", "ref": out / "fid_ref_val.npz",
            "fid_ka_mig": out / "fid_ka_mig", "fid_backbone": out / "fid_backbone",
            "tokenizer": assets / TOKENIZER_FILE, "backbone": assets / BACKBONE_FILE, "logs": out / "logs"}


def run_demo(config_file, overrides, out, data_root=None, assets=None, threads=0) -> dict:
    """`make demo`: the whole pipeline on the committed demo weights; returns the metrics dict."""
    t_start = time.time()
    config_file = config_path(config_file)
    config = load_demo_config(config_file, overrides)
    d = config.demo
    out = resolve(out)
    data_root = resolve(data_root) if data_root else repo_path(d.data_root)
    assets = resolve(assets) if assets else repo_path(d.assets)
    p = demo_paths(out, assets)
    for key in ("tokenizer", "backbone"):
        if not p[key].is_file():
            raise FileNotFoundError(f"demo weights not found: {p[key]} (rebuild them with `make demo-assets`)")
    clean_outputs(out, DEMO_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    n_threads, why = pick_threads(threads)
    runner = Runner(p["logs"], n_threads, total_stages=9)
    C = config.model.num_classes
    print(f"KA-MIG CPU demo -> {out}\n  config {config_file}; data {data_root}; weights {assets}; "
          f"threads {n_threads} ({why})", flush=True)

    common = ["--config", str(config_file), *[f"--config.{k}={v}" for k, v in overrides],
              f"--config.output_dir={out}", "--config.run_name=ka_mig", f"--config.data.path={p['tokens']}",
              f"--config.tokenizer.checkpoint={p['tokenizer']}", f"--config.train.init_checkpoint={p['backbone']}",
              f"--config.graph.dir={p['graphs']}"]
    sampling = ["--device", "cpu", "--batch-size", str(d.batch_size), "--seed", str(d.sample_seed)]

    runner.run("data", ["-m", "demo.make_data", "--out", str(data_root), *common],
               f"procedural images, {C} classes x ({d.train_per_class} train + {d.val_per_class} held-out)")
    runner.run("tokens", ["extract_imagenet_feature.py", "--path", str(data_root), "--split", "train",
                          "--out", str(p["tokens"]), "--no-flip", "--workers", "0", "--device", "cpu",
                          "--batch-size", "250", "--overwrite", *common],
               "tokenize the train split with the demo VQGAN")
    runner.run("graphs", ["-m", "graph_construction.build_graphs", "--tokens", str(p["tokens"]),
                          "--num-threads", str(n_threads), *common],
               "G_co, G_s and G_p from the demo tokens")
    runner.run("train_ka_mig", ["train_graph.py", *common],
               f"KA-MIG graph modules + head on the frozen backbone, {config.train.n_steps} steps")
    classes = [str(c) for c in range(C)]
    grids = {}
    for kind, ckpt in (("ka_mig", p["ka_mig"]), ("backbone", p["backbone"])):
        model = "ka_mig" if kind == "ka_mig" else "autonat"
        run_root = p["grid_runs"] / kind
        runner.run(f"grid_{kind}", ["generate_img.py", "--model", model, "--checkpoint", str(ckpt), "--classes", *classes,
                                    "--per-class", str(d.grid_per_class), "--out", str(run_root), *sampling, *common],
                   f"a labelled grid, {d.grid_per_class} samples of every class ({kind})")
        grids[kind] = newest_run(run_root)
        copy_atomic(grids[kind] / "grid.png", out / f"grid_{kind}.png")
    runner.run("fid_reference", ["-m", "libs.evaluation.fid_stats", "--images", str(data_root / "val"), "--out", str(p["ref"]),
                                 "--device", "cpu", "--batch-size", str(d.batch_size)],
               f"Inception statistics of the {C * d.val_per_class} held-out images")
    fid = {}
    for kind, ckpt in (("ka_mig", p["ka_mig"]), ("backbone", p["backbone"])):
        model = "ka_mig" if kind == "ka_mig" else "autonat"
        folder = p[f"fid_{kind}"]
        runner.run(f"fid_{kind}", ["generate_npz.py", "--model", model, "--checkpoint", str(ckpt),
                                   "--num-samples", str(d.fid_samples), "--ref-stats", str(p["ref"]), "--out", str(folder),
                                   *sampling, *common],
                   f"{d.fid_samples} samples (seed {d.sample_seed}) and their FID ({kind})")
        fid[kind] = json.loads((folder / "metrics.json").read_text())
    comparison_figure(data_root / "val", grids, out / "comparison.png", C, per_class=min(4, d.grid_per_class))
    metrics = demo_metrics(config, config_file, overrides, out, p, fid, runner, n_threads, why, t_start)
    write_json(out / "metrics.json", metrics)
    text = summary_text(metrics, out)
    atomic_write_text(out / "summary.txt", text)
    print("\n" + text, flush=True)
    return metrics


def newest_run(root: Path) -> Path:
    """The newest run folder generate_img.py made under root (it names them <model>_seed<s>_<time>)."""
    runs = sorted((r for r in root.iterdir() if r.is_dir() and (r / "grid.png").is_file()),
                  key=lambda r: r.stat().st_mtime)
    if not runs:
        raise StageFailed(f"generate_img.py left no grid.png under {root}")
    return runs[-1]


def comparison_figure(val_root: Path, grids: dict, path: Path, num_classes: int, per_class: int = 4, scale: int = 3):
    """One PNG: per class (rows) `per_class` held-out images | backbone samples | KA-MIG samples, upscaled."""
    def load(p):
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    names, items = list_image_folder(val_root)
    real = {c: [val_root / rel for rel, lab in items if lab == c][:per_class] for c in range(num_classes)}
    samples = {}
    for kind, run in grids.items():  # generate_img.py names samples <index>_class<c>.png
        files = sorted(run.glob("*_class*.png"))
        samples[kind] = {c: [f for f in files if f.stem.endswith(f"_class{c}")][:per_class] for c in range(num_classes)}
    columns = [("held-out", real)] + [(k, samples[k]) for k in ("backbone", "ka_mig") if k in samples]
    first = load(real[0][0])
    h, w = first.shape[0] * scale, first.shape[1] * scale
    gap, head, left = 8, 16, 90
    width = left + len(columns) * (per_class * w + gap)
    canvas = Image.new("RGB", (width, head + num_classes * h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (title, table) in enumerate(columns):
        x0 = left + j * (per_class * w + gap)
        draw.text((x0 + 2, 2), title if title != "ka_mig" else "KA-MIG", fill="black")
        for c in range(num_classes):
            for k, f in enumerate(table[c]):
                img = Image.fromarray(load(f)).resize((w, h), Image.NEAREST)
                canvas.paste(img, (x0 + k * w, head + c * h))
    for c in range(num_classes):
        draw.text((4, head + c * h + h // 2 - 6), names[c], fill="black")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def read_train_log(path: Path) -> list:
    """Rows of the trainer's log.csv as dicts of floats."""
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def loss_start_end(log: list, k: int = 3) -> dict:
    """Mean training loss of the first and of the last k logged steps (single-batch losses are noisy)."""
    losses = [row["loss"] for row in log]
    if not losses:
        return {"loss_start": None, "loss_end": None, "loss_rows_averaged": 0}
    k = min(k, len(losses))
    return {"loss_start": float(np.mean(losses[:k])), "loss_end": float(np.mean(losses[-k:])), "loss_rows_averaged": k}


def demo_metrics(config, config_file, overrides, out, p, fid, runner, threads, why, t_start) -> dict:
    """The metrics.json of a demo run."""
    log = read_train_log(p["train_log"])
    ka, bb = float(fid["ka_mig"]["fid"]), float(fid["backbone"]["fid"])
    d = config.demo
    return {
        "fid": {"ka_mig": ka, "backbone": bb},
        "fid_difference_ka_mig_minus_backbone": ka - bb,
        "ka_mig_better": bool(ka < bb),
        "num_samples": int(d.fid_samples),
        "num_samples_per_model": {"ka_mig": int(fid["ka_mig"]["n"]), "backbone": int(fid["backbone"]["n"])},
        "sample_seed": int(d.sample_seed),
        "reference": {"images": int(config.model.num_classes * d.val_per_class), "split": "val (held out)",
                      "path": str(p["ref"])},
        "inception_weights": fid["ka_mig"].get("inception_weights"),
        "train": {"steps": int(config.train.n_steps), "batch_size": int(config.train.batch_size),
                  **loss_start_end(log), "log": str(p["train_log"])},
        "stage_seconds": dict(runner.seconds),
        "total_seconds": round(time.time() - t_start, 2),
        "threads": threads, "threads_reason": why,
        "config": str(config_file), "overrides": [f"--config.{k}={v}" for k, v in overrides],
        "weights": {"tokenizer": str(p["tokenizer"]), "backbone": str(p["backbone"]), "ka_mig": str(p["ka_mig"])},
        "outputs": {"grids": [str(out / "grid_ka_mig.png"), str(out / "grid_backbone.png")],
                    "comparison": str(out / "comparison.png"), "logs": str(p["logs"])},
    }


def summary_text(m: dict, out: Path) -> str:
    """The honest closing summary of a demo run."""
    ka, bb = m["fid"]["ka_mig"], m["fid"]["backbone"]
    if ka < bb:
        verdict = f"KA-MIG has the lower (better) FID on this run, by {bb - ka:.2f}."
    elif ka > bb:
        verdict = f"KA-MIG did NOT beat the bare backbone on this run: its FID is higher (worse) by {ka - bb:.2f}."
    else:
        verdict = "KA-MIG and the bare backbone have the same FID on this run."
    times = ", ".join(f"{k} {v:.0f}s" for k, v in m["stage_seconds"].items())
    lines = [
        "=" * 78,
        "KA-MIG CPU demo: summary",
        f"  FID KA-MIG   {ka:8.2f}   ({m['num_samples']} samples)",
        f"  FID backbone {bb:8.2f}   ({m['num_samples']} samples, same labels and seeds)",
        f"  reference    {m['reference']['images']} held-out demo images; Inception weights: {m['inception_weights']}",
        f"  {verdict}",
        f"  A demo-scale FID ({m['num_samples']} samples vs {m['reference']['images']} reference images, 32x32 images "
        "upscaled to 299) is strongly biased upwards and noisy; differences of a few points can be noise. It "
        "checks that the pipeline runs end to end, not the paper's claim.",
        f"  KA-MIG training: {m['train']['steps']} steps, loss {fmt(m['train']['loss_start'])} -> "
        f"{fmt(m['train']['loss_end'])} (mean of the first / last {m['train']['loss_rows_averaged']} logged steps; "
        f"log: {m['train']['log']})",
        f"  time: {m['total_seconds']:.0f} s total ({times}); {m['threads']} thread(s) per stage",
        f"  outputs in {out}: grid_ka_mig.png, grid_backbone.png, comparison.png, metrics.json, logs/",
        "=" * 78,
    ]
    return "\n".join(lines) + "\n"


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def write_json(path: Path, obj):
    """Atomic indented JSON (keys in the order given)."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


# ----------------------------------------------------------------------------- make demo-assets


def build_assets(config_file, backbone_config_file, overrides, work, assets, data_root=None, threads=0) -> dict:
    """`make demo-assets`: data -> tokenizer -> tokens -> backbone pretraining; copies the weights to `assets`."""
    t_start = time.time()
    config_file, backbone_config_file = config_path(config_file), config_path(backbone_config_file)
    config = load_demo_config(config_file, overrides)
    work, assets = resolve(work), resolve(assets)
    data_root = resolve(data_root) if data_root else repo_path(config.demo.data_root)
    clean_outputs(work, ASSET_OUTPUTS)
    work.mkdir(parents=True, exist_ok=True)
    n_threads, why = pick_threads(threads)
    runner = Runner(work / "logs", n_threads, total_stages=4)
    tokenizer, tokens = work / "tokenizer.pth", work / "tokens" / "train"
    print(f"demo assets -> {assets} (work folder {work}); threads {n_threads} ({why})", flush=True)
    cfg_overrides = [f"--config.{k}={v}" for k, v in overrides]
    runner.run("data", ["-m", "demo.make_data", "--config", str(config_file), *cfg_overrides, "--out", str(data_root)],
               "procedural images (the same seeds as make demo)")
    runner.run("tokenizer", ["-m", "demo.train_tokenizer", "--config", str(config_file), *cfg_overrides,
                             "--data", str(data_root / "train"), "--val", str(data_root / "val"), "--out", str(tokenizer)],
               f"train the demo VQGAN, {config.tokenizer_train.steps} steps")
    runner.run("tokens", ["extract_imagenet_feature.py", "--config", str(config_file), *cfg_overrides,
                          f"--config.tokenizer.checkpoint={tokenizer}", "--path", str(data_root), "--split", "train",
                          "--out", str(tokens), "--no-flip", "--workers", "0", "--device", "cpu", "--batch-size", "250",
                          "--overwrite"],
               "tokenize the train split")
    runner.run("backbone", ["train_graph.py", "--config", str(backbone_config_file), *cfg_overrides,
                            f"--config.output_dir={work}", "--config.run_name=backbone",
                            f"--config.data.path={tokens}", f"--config.tokenizer.checkpoint={tokenizer}"],
               "pretrain the demo AutoNAT backbone (train_graph.py, mode pretrain)")
    assets.mkdir(parents=True, exist_ok=True)
    copy_atomic(tokenizer, assets / TOKENIZER_FILE)
    copy_atomic(Path(str(tokenizer) + ".json"), assets / (TOKENIZER_FILE + ".json"))
    copy_atomic(work / "backbone" / "model_ema.pth", assets / BACKBONE_FILE)
    copy_atomic(work / "backbone" / "log.csv", assets / "autonat_demo_log.csv")
    backbone_cfg = load_demo_config(backbone_config_file, overrides)
    log = read_train_log(work / "backbone" / "log.csv")
    manifest = {
        "recipe": "make demo-assets (python -m demo.make_assets): demo/make_data.py -> demo/train_tokenizer.py -> "
                  "extract_imagenet_feature.py -> train_graph.py (mode pretrain)",
        "config": shown_path(config_file), "backbone_config": shown_path(backbone_config_file),
        "overrides": cfg_overrides,
        "files": {name: {"bytes": (assets / name).stat().st_size, "sha256": sha256(assets / name)}
                  for name in (TOKENIZER_FILE, BACKBONE_FILE)},
        "tokenizer": json.loads((assets / (TOKENIZER_FILE + ".json")).read_text())["report"],
        "backbone": {"steps": int(backbone_cfg.train.n_steps), "batch_size": int(backbone_cfg.train.batch_size),
                     **loss_start_end(log)},
        "stage_seconds": dict(runner.seconds), "total_seconds": round(time.time() - t_start, 2),
        "threads": n_threads, "threads_reason": why,
    }
    write_json(assets / MANIFEST_FILE, manifest)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"\nwrote {assets}: {', '.join(manifest['files'])} ({total / 2 ** 20:.1f} MiB) in "
          f"{manifest['total_seconds']:.0f} s", flush=True)
    return manifest


def copy_atomic(src: Path, dst: Path):
    """Copies a file so that `dst` is never half written."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def sha256(path: Path) -> str:
    return file_sha256(path)
