"""Experiment tracking through accelerate's trackers: TensorBoard in `<run folder>/tb/` (default), W&B, or none.

The main process logs; the CSV logs of the run folder stay the record that resume and the tests read.
"""
import importlib.util
import os
import secrets
import time
from pathlib import Path

import numpy as np

from libs.atomic_io import atomic_write_text
from libs.errors import UserError

LOG_WITH = ("tensorboard", "wandb", "none")  # train.log_with choices
DEFAULT_LOG_WITH = "tensorboard"  # configs written before train.log_with existed
TB_FOLDER = "tb"                  # TensorBoard's event files: <run folder>/tb/
WANDB_PROJECT = "ka-mig"          # the W&B project every run goes to (the run is named after the run folder)
WANDB_ID_FILE = "wandb_run_id.txt"  # the W&B run id, kept in the run folder so a resume continues that run
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "masked_ratio", "tokens_per_s", "skipped_steps")  # train/<name>
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


def log_with(config) -> str:
    """config.train.log_with: 'tensorboard' (also when absent), 'wandb' or 'none'."""
    return config.train.get("log_with", DEFAULT_LOG_WITH)


def check_tracker(kind: str):
    """Raises UserError (one line, naming the pip command) when the tracker's package is not installed."""
    package = PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"train.log_with '{kind}' needs the {package} package: pip install {package} "
                        f"(or --config.train.log_with=none)")


def accelerator_kwargs(kind: str, run_dir) -> dict:
    """The Accelerator arguments of a tracker: log_with (None for 'none') and the run folder as project_dir."""
    check_tracker(kind)
    return {"log_with": None if kind == "none" else kind, "project_dir": str(run_dir)}


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id: read from WANDB_ID_FILE, or drawn and written there on the first start."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 hex characters, as W&B draws them
    atomic_write_text(path, run_id + "\n")
    return run_id


def wait_for_a_later_event_file(tb_dir: Path):
    """Sleeps (at most 3 s) until a new event file's name, which starts with the time in whole seconds,
    sorts after every earlier one: TensorBoard reads a folder's files in name order, and the purge step of the
    new file must come after the steps it hides."""
    stamps = [int(p.name.split(".")[3]) for p in Path(tb_dir).glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps) <= int(time.time()) + 2:  # files further ahead: not waited for
        time.sleep(0.05)


def start_tracking(acc, kind: str, run_dir: Path, run_name: str, first_step: int, config: dict = None):
    """Opens the tracker on the main process for a segment whose first logged step is `first_step`.

    TensorBoard: a new event file in <run_dir>/tb/ whose purge_step hides what an earlier segment logged at
    steps >= first_step (logged after its last checkpoint), so a resumed curve has each step once. W&B: offline
    unless WANDB_API_KEY is set (or WANDB_MODE chosen), resuming the run whose id the run folder keeps."""
    if kind == "none" or not acc.is_main_process:
        return
    if kind == "tensorboard":
        wait_for_a_later_event_file(Path(run_dir) / TB_FOLDER)
        acc.init_trackers(TB_FOLDER, init_kwargs={"tensorboard": {"purge_step": first_step}})
    elif kind == "wandb":
        if "WANDB_API_KEY" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
        init = {"id": wandb_run_id(run_dir), "resume": "allow", "name": run_name, "dir": str(run_dir),
                "config": config or {}}
        acc.init_trackers(WANDB_PROJECT, init_kwargs={"wandb": init})


def end_tracking(acc):
    """Flushes and closes the trackers (without accelerate's end_training, which also ends the process group)."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []


def log_train(acc, stats: dict):
    """Logs a CSV row's values as train/<name> scalars at its step (main process only)."""
    if acc.trackers:
        acc.log({f"train/{k}": float(stats[k]) for k in TRAIN_SCALARS if k in stats}, step=int(stats["step"]))


def log_evaluation(acc, step: int, result: dict, grid=None):
    """Logs eval/fid, eval/inception_score (when computed) and the labelled sample grid (a PIL image)."""
    if not acc.trackers:
        return
    values = {f"eval/{k}": float(result[k]) for k in ("fid", "inception_score") if result.get(k) is not None}
    acc.log(values, step=step)
    if grid is None:
        return
    pixels = np.asarray(grid.convert("RGB"))  # [H, W, 3] uint8
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("eval/samples", pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        else:
            tracker.log_images({"eval/samples": [grid]}, step=step)


# ----------------------------------------------------------------------------- figures and numbers of a finished run

LOG_WITH_FLAG = ("none", "tensorboard", "wandb")  # --log-with choices of the demo drivers and the strategy search


def add_log_with_flag(parser):
    """Adds --log-with {none,tensorboard,wandb} (default none: nothing is logged, nothing new is written)."""
    parser.add_argument("--log-with", default="none", choices=LOG_WITH_FLAG,
                        help="also send the run's figures and headline numbers to a tracker at the end: "
                             f"tensorboard (<out>/{TB_FOLDER}/), wandb (offline unless WANDB_API_KEY is set; run id "
                             f"in <out>/{WANDB_ID_FILE}) or none (default)")


def check_log_with(kind: str):
    """Raises UserError (one line) when --log-with names a tracker whose package is not installed."""
    try:
        check_tracker(kind)
    except UserError as e:
        raise UserError(f"--log-with '{kind}' needs the {PACKAGES[kind]} package: pip install "
                        f"{PACKAGES[kind]} (or --log-with none)") from e


def open_tracker(kind: str, out: Path, run_name: str):
    """A started accelerate tracker for a finished run in `out`: TensorBoard in <out>/tb/ (a new event file whose
    purge step 0 hides what earlier runs into `out` logged), or W&B (offline unless WANDB_API_KEY is set) continuing
    the run whose id `out` keeps. Call it on the main process only."""
    import torch
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker
    PartialState(cpu=not torch.cuda.is_available())  # accelerate's log calls need it (the trainer's choice of device)
    out = Path(out)
    if kind == "tensorboard":
        wait_for_a_later_event_file(out / TB_FOLDER)
        tracker = TensorBoardTracker(TB_FOLDER, str(out), purge_step=0)
    else:
        if "WANDB_API_KEY" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
        tracker = WandBTracker(WANDB_PROJECT, id=wandb_run_id(out), resume="allow", name=run_name, dir=str(out))
    tracker.main_process_only = False  # the caller runs on the main process only: no collective check
    tracker.start()
    return tracker


def log_run(kind: str, out, run_name: str, rows, images=None, texts=None):
    """Logs a finished run's results into one tracker run of `out` (nothing for kind 'none').

    rows: [(step, {tag: number})] scalars; images: {tag: PNG path} at step 0; texts: {tag: str} at step 0.
    Raises OSError/ValueError when a PNG cannot be read (the run's own files are written before)."""
    if kind == "none":
        return
    from PIL import Image
    tracker = open_tracker(kind, out, run_name)
    try:
        for step, values in rows:
            tracker.log({tag: float(v) for tag, v in values.items()}, step=int(step))
        for tag, path in (images or {}).items():
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, np.asarray(rgb), global_step=0, dataformats="HWC")  # [H, W, 3] uint8
            else:
                tracker.log_images({tag: [rgb]}, step=0)
        if texts:
            tracker.log(dict(texts), step=0)
    finally:
        tracker.finish()
