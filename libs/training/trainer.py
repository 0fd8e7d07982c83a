"""Training loop of train_graph.py: pretrain (backbone) or ka_mig (graph modules on a frozen backbone)."""
import contextlib
import csv
import io
import math
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from libs.atomic_io import append_lines, atomic_torch_save, atomic_write_json, atomic_write_text, clean_stale_temps
from libs.checkpoint import EXPORT_NAME, load_state_dict_file, load_strict, save_weights
from libs.cli import check_writable
from libs.config import config_to_dict, flatten_config
from libs.distributed import verdict_on_main
from libs.errors import BadInput
from libs.folder_lock import FolderLock
from libs.models.factory import build_model, model_kind
from libs.training.inputs import input_changes
from libs.training.objective import make_masked_batch, masked_token_loss, masking_options
from libs.training.tracking import accelerator_kwargs, end_tracking, log_train, log_with, start_tracking

# ----------------------------------------------------------------------------- model

MODE_MODEL = {"pretrain": "autonat", "ka_mig": "ka_mig"}  # train.mode -> the model kind it trains (AutoNAT's;
#                                                            mode_kind gives config.backbone's)
TRAINED_PREFIXES = {"pretrain": ("",), "ka_mig": ("graph_layer.", "mlm_layer.")}  # '' = every parameter


def check_mode(mode: str):
    """Raises BadInput (a ValueError) for an unknown train.mode."""
    if mode not in MODE_MODEL:
        raise BadInput(f"unknown train.mode '{mode}' ({' or '.join(MODE_MODEL)})")


def init_model(config, graphs: dict = None):
    """The model `train.mode` trains (mode_kind): a fresh backbone (pretrain) or the backbone with the graphs on
    `train.init_checkpoint` (ka_mig: KA-MIG on AutoNAT, KA-MaskGIT on MaskGIT).

    A KA-MIG run loads the backbone strictly with its graph modules left at their (zero-fusion) init.
    Raises BadInput when ka_mig mode has no init_checkpoint, MissingAssetError when the file is absent.
    """
    mode = config.train.mode
    check_mode(mode)
    model = build_model(config, mode_kind(config), graphs)
    init = config.train.init_checkpoint
    if init:
        allow = ("graph_layer.",) if mode == "ka_mig" else ()
        load_strict(model, load_state_dict_file(init), source=init, allow_missing=allow)
    elif mode == "ka_mig":
        raise BadInput("train.mode=ka_mig needs the frozen backbone: set config.train.init_checkpoint "
                         "(default assets/nnet_ema.pth)")
    return model


def mode_kind(config) -> str:
    """The model kind train.mode trains on config.backbone: the bare backbone (pretrain), or with the graphs."""
    return model_kind(config, graphs=MODE_MODEL[config.train.mode] == "ka_mig")


def freeze_for_mode(model, mode):
    """Sets requires_grad per mode; returns the trained parameter names."""
    check_mode(mode)
    prefixes = TRAINED_PREFIXES[mode]
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            names.append(name)
    return names


# ----------------------------------------------------------------------------- data


class StepBatches:
    """Deterministic global batches: step s reads positions [s*B, (s+1)*B) of seeded per-epoch permutations."""

    def __init__(self, num_items, global_batch, seed):
        self.n, self.global_batch, self.seed = num_items, global_batch, seed
        self.perms = {}

    def perm(self, epoch):
        if epoch not in self.perms:
            self.perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self.perms[epoch]

    def indices(self, step):  # -> [global_batch] item indices of this step
        pos = torch.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.cat([self.perm(int(e))[offsets[epochs == e]] for e in epochs.unique()])


def lr_at(step, base_lr, warmup):
    """Linear warmup over `warmup` steps, then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


# ----------------------------------------------------------------------------- resume rules

# The config keys a resumed run may change; every other key must equal the checkpoint's config, or the resume
# stops (BadInput). A name ending in '*' covers every key starting with what precedes it. The number of
# processes is no key: it may change while the global batch (train.batch_size) stays the same, and so may
# train.grad_accum, the other half of how that batch is split (float results then differ slightly).
RESUME_MAY_CHANGE = (
    "train.n_steps",                                             # train longer (or stop sooner)
    "train.save_interval", "train.log_interval", "train.keep_checkpoints",  # bookkeeping only
    "train.max_skipped_steps",                                   # the fp16 overflow limit
    "train.fid_*",                                               # periodic FID (evaluation only)
    "output_dir", "run_name",                                    # where the run folder lives
    "train.grad_accum",                                          # how the unchanged global batch is split
    "train.compile",                                             # torch.compile: same weights, float rounding only
    "train.log_with",                                            # where the curves go (the CSV logs stay)
)
# Where the run lives, not how it trains: left out of the config stored in checkpoints, so that the same run
# in two folders writes byte-identical checkpoints.
LOCATION_KEYS = ("output_dir", "run_name")


def may_change_on_resume(key: str) -> bool:
    return any(key == rule or (rule.endswith("*") and key.startswith(rule[:-1])) for rule in RESUME_MAY_CHANGE)


_ABSENT = "(absent)"


def config_changes(stored: dict, current: dict):
    """(allowed, refused, unrecorded): (key, checkpoint value, current value) of the keys that differ.

    `unrecorded` are keys the checkpoint's config does not hold (settings added to the code after it was
    written): they cannot be compared and are only reported. A key the checkpoint holds but the current config
    lacks is refused like any other difference (its setting can no longer be honoured)."""
    a, b = flatten_config(stored), flatten_config(current)
    allowed, refused, unrecorded = [], [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == new or (isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and list(old) == list(new)):
            continue
        if key not in a:
            if key not in LOCATION_KEYS:  # the location is never stored
                unrecorded.append((key, old, new))
        elif may_change_on_resume(key):
            allowed.append((key, old, new))
        else:
            refused.append((key, old, new))
    return allowed, refused, unrecorded


def stored_config(config) -> dict:
    """The config as checkpoints store it: everything but the run's location."""
    return {k: v for k, v in config_to_dict(config).items() if k not in LOCATION_KEYS}


# ----------------------------------------------------------------------------- logs and checkpoints

LOG_FILES = ("log.csv", "fid.csv")  # per-step logs of the run folder, cut back to the checkpoint on resume


def _csv_text(fieldnames, rows, header=True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _log_text(path: Path) -> str:
    """A log's text as stored (newlines untranslated)."""
    with open(path, newline="") as f:
        return f.read()


def _csv_header(path: Path) -> list:
    """The column names of a CSV log's first line; [] if the file holds no complete first line."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        line = f.readline()
    return next(csv.reader([line])) if line.endswith("\n") else []


def read_csv(path: Path):
    """(fieldnames, rows) of a CSV log; rows that do not parse and a last line without its newline (a line cut
    by a crash) are dropped."""
    if not path.is_file():
        return [], []
    text = _log_text(path)
    reader = csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1], newline=""))
    fields = list(reader.fieldnames or [])
    rows = [r for r in reader if None not in r and None not in r.values()]
    return fields, rows


def append_csv(path: Path, row: dict):
    """Adds one row to a CSV log: appended and flushed to disk (libs.atomic_io.append_lines), never rewriting
    the rows already there, so a crash can cut at most this row (readers and the next append leave it out).
    The first row writes the header too; a key the header lacks rewrites the file once, atomically, with the
    new column (older rows leave it empty). One process appends to a run's logs (the run folder's lock)."""
    path = Path(path)
    header = _csv_header(path)
    if header and all(k in header for k in row):
        append_lines(path, _csv_text(header, [row], header=False))
        return
    fields, rows = read_csv(path)
    fields += [k for k in row if k not in fields]
    atomic_write_text(path, _csv_text(fields, rows + [{k: row.get(k, "") for k in fields}]))


def truncate_csv(path: Path, max_step: int):
    """Keeps the rows of a CSV log with step <= max_step (what a resume from that step will log again); the file
    is replaced atomically, and only when its text changes (rows cut, or a line a crash left unfinished)."""
    path = Path(path)
    fields, rows = read_csv(path)
    if not fields:
        return
    kept = []
    for r in rows:
        try:
            if int(float(r["step"])) <= max_step:
                kept.append(r)
        except (KeyError, TypeError, ValueError):
            pass
    if not kept:
        path.unlink(missing_ok=True)
        return
    text = _csv_text(fields, kept)
    if text != _log_text(path):
        atomic_write_text(path, text)


def step_of(path: Path) -> int:
    return int(path.name[len("step_"):].split(".")[0])


def list_checkpoints(ckpt_dir: Path):
    """checkpoints/step_<n>.pt files, newest (highest step) first."""
    return sorted((p for p in Path(ckpt_dir).glob("step_*.pt") if p.name[5:-3].isdigit()), key=step_of,
                  reverse=True)


def non_finite_tensors(tree, prefix="") -> list:
    """Names of the floating-point tensors in a nested dict / list that hold NaN or inf."""
    bad = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "tensor")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            bad += non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += non_finite_tensors(v, f"{prefix}[{i}]")
    return bad


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint; ValueError if it is not one or holds non-finite weights."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"step", "model", "ema"} <= set(state):
        raise ValueError("not a train_graph.py checkpoint (no 'step' / 'model' / 'ema' entries)")
    bad = non_finite_tensors({"model": state["model"], "ema": state["ema"]})
    if bad:
        raise NonFiniteCheckpoint(f"{len(bad)} tensors hold NaN/inf (first: {', '.join(bad[:3])})")
    return state


class NonFiniteCheckpoint(ValueError):
    """A checkpoint whose weights hold NaN or inf (written by older code): never resumed from."""


def load_latest_checkpoint(ckpt_dir: Path, log=print):
    """(path, state) of the newest usable checkpoint, else (None, None).

    A checkpoint that does not load (truncated, corrupt) is renamed `<name>.unreadable`, one with non-finite
    weights `<name>.nonfinite`: set aside, so it can neither be resumed from nor displace the readable ones
    when old checkpoints are pruned. Run it in one process only (it renames files).
    """
    for path in list_checkpoints(ckpt_dir):
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is set aside, never fatal
            aside = path.with_name(path.name + (".nonfinite" if isinstance(e, NonFiniteCheckpoint) else ".unreadable"))
            try:
                os.replace(path, aside)
                where = f"; moved to {aside.name}"
            except OSError as move_error:
                where = f"; could not move it aside ({move_error})"
            log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {str(e)[:200]}{where}")
    return None, None


def prune_checkpoints(ckpt_dir: Path, newest: Path, keep: int) -> list:
    """Removes checkpoints older than the `keep` newest up to `newest` (the one just saved), which is always
    kept; files of a higher step than `newest` are neither counted nor removed. Returns the removed files."""
    newest_step = step_of(newest)
    older = [p for p in list_checkpoints(ckpt_dir) if step_of(p) < newest_step]
    removed = older[max(keep - 1, 0):]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------- trainer


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weight (or the fp16 loss scaler gave up): the run stops
    without writing non-finite weights; train_graph.py exits with status 1."""


def enable_fp16_on_cpu(acc: Accelerator):
    """Switches on accelerate's own fp16 path (autocast + loss scaler) where it accepts fp16 but runs float32.

    accelerate (1.x) takes mixed_precision="fp16" on a CPU without error yet sets up neither autocast nor a
    GradScaler. Here it gets torch.amp's CPU pair: autocast(device_type="cpu", dtype=float16), which
    accelerate's autocast() and prepare() apply once `native_amp` is set, and GradScaler("cpu"), which its
    backward() and prepared optimizer use. So CPU and GPU share one training step. Call before prepare();
    does nothing for other precisions, on a GPU, or where accelerate already made a scaler.
    """
    if acc.mixed_precision != "fp16" or acc.device.type != "cpu" or acc.scaler is not None:
        return
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu")
    warnings.warn("train.mixed_precision=fp16 on a CPU: most CPUs emulate fp16 arithmetic, many times slower than "
                  "float32; bf16 or 'no' train faster there")


class Trainer:
    """Runs `config.train` with accelerate (DDP, mixed precision), EMA, exact resume, rank-0 logging."""

    def __init__(self, config, tokens, labels, graphs=None, model=None, inputs=None, allow_input_change=False):
        """`inputs`: a callable giving the fingerprint of what the run reads (libs.training.inputs.training_inputs;
        called on the main process), stored in checkpoints and compared on resume; None records nothing.
        `allow_input_change`: resume after the inputs changed (logged) instead of raising BadInput.
        Raises FolderBusy when another process holds the run folder."""
        t = config.train
        self.config = config
        self.precision = t.mixed_precision
        self.tracking = log_with(config)  # one-line UserError now when its package is missing
        trackers = accelerator_kwargs(self.tracking, Path(config.output_dir) / config.run_name)
        self.accelerator = acc = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available(),
                                             **trackers)
        enable_fp16_on_cpu(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        per_step = self.world * t.grad_accum
        if t.batch_size % per_step:
            raise BadInput(f"train.batch_size {t.batch_size} (global) must divide by processes x grad_accum "
                           f"= {self.world} x {t.grad_accum}")
        self.micro_batch = t.batch_size // per_step
        self.run_dir = Path(config.output_dir) / config.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        # both folders take files (no file in the way, not read-only) before any step: else a blocked checkpoints/
        # is found at the first checkpoint, its steps lost
        self.on_main(lambda: check_writable(folders=[self.run_dir, self.ckpt_dir]))
        # one process per run folder: the main process holds its lock until close() or its end
        self.run_lock = FolderLock(self.run_dir, "run folder", "or start a new run with another --config.run_name")
        self.run_lock.acquire_on_main(self)
        self.inputs = self.on_main(inputs) if callable(inputs) else inputs
        self.allow_input_change = allow_input_change
        self.tokens, self.labels = tokens, labels
        self.batches = StepBatches(len(tokens), t.batch_size, config.seed)

        if model is None:
            torch.manual_seed(config.seed)  # same initialisation on every rank and in every run
            model = init_model(config, graphs)
        self.trained_names = freeze_for_mode(model, t.mode)
        if t.compile:  # torch.compile block by block: parameter names, checkpoints and EMA stay those of eager
            for block in model.blocks:
                block.compile()
        self.trained_set = set(self.trained_names)
        params = [p for n, p in model.named_parameters() if n in self.trained_set]
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=t.lr, betas=tuple(t.betas))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema = {n: p.detach().float().clone() for n, p in self.unwrapped.named_parameters()
                    if n in self.trained_set}
        self.step = 0
        self.skipped_total = 0  # optimizer steps the fp16 loss scaler skipped (gradient overflow), in all
        self.skipped_run = 0    # ... in a row, up to the last step

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def scaler(self):
        """The fp16 loss scaler (accelerate's on a GPU, GradScaler("cpu") on a CPU), else None."""
        return getattr(self.optimizer, "scaler", None)

    def on_main(self, check):
        """`check()` on the main process only; its return value, or its UserError, on every process."""
        from accelerate.utils import broadcast_object_list
        return verdict_on_main(check, self.accelerator.is_main_process, lambda obj: broadcast_object_list([obj])[0])

    def close(self):
        """Releases the run folder's lock (the end of the process releases it too)."""
        self.run_lock.release()

    def log(self, msg):
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    # --- state

    def trained_state(self):
        return {n: p.detach().cpu().clone() for n, p in self.unwrapped.named_parameters() if n in self.trained_set}

    def checkpoint_state(self):
        scaler = self.scaler
        # the fingerprint of the token dataset and graphs, compared on resume (runs on in-memory data have none)
        inputs = {"inputs": self.inputs} if self.inputs is not None else {}
        return {"model": self.trained_state(),
                "ema": {n: v.cpu().clone() for n, v in self.ema.items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": self.step,
                "skipped_steps": {"total": self.skipped_total, "in_a_row": self.skipped_run},
                "processes": self.world,
                "config": stored_config(self.config),
                "trained_params": list(self.trained_names),
                "rng": {"scheme": "every step reseeds from (seed, rank, step)", "seed": self.config.seed,
                        "torch": torch.get_rng_state()}, **inputs}

    def load_state(self, state):
        missing = set(self.trained_names) - set(state["model"])
        if missing:
            raise BadInput(f"checkpoint does not hold the trained parameters {sorted(missing)[:5]} "
                           f"(was it made with another train.mode?)")
        with torch.no_grad():
            for n, p in self.unwrapped.named_parameters():
                if n in self.trained_set:
                    p.copy_(state["model"][n])
        self.ema = {n: state["ema"][n].to(self.accelerator.device).float().clone() for n in self.trained_names}
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        skipped = state.get("skipped_steps") or {}
        self.skipped_total, self.skipped_run = int(skipped.get("total", 0)), int(skipped.get("in_a_row", 0))

    def check_finite_weights(self, what: str):
        """Raises NonFiniteError (on every rank alike) if a trained weight or its EMA holds NaN/inf."""
        bad = non_finite_tensors({"model": {n: p for n, p in self.unwrapped.named_parameters()
                                            if n in self.trained_set}, "ema": self.ema})
        flag = self.accelerator.reduce(torch.tensor(float(len(bad)), device=self.accelerator.device), "sum")
        if float(flag) > 0:
            shown = ", ".join(bad[:3]) if bad else "on another process"
            raise NonFiniteError(f"step {self.step}: {len(bad) or 'some'} weight tensors hold NaN/inf ({shown}); "
                                 f"{what} not written. {self.last_checkpoint_hint()}")

    def last_checkpoint_hint(self) -> str:
        ckpts = list_checkpoints(self.ckpt_dir)
        where = f"The last checkpoint, {ckpts[0]}, holds finite weights" if ckpts else "No checkpoint was written"
        return (f"{where}; to continue with another train.lr or train.grad_clip, start a new run from it "
                f"(another --config.run_name with --config.train.init_checkpoint, or rerun as it is)")

    def save_checkpoint(self):
        """Rank 0 writes step_<n>.pt atomically, then prunes older ones beyond keep_checkpoints (never the new
        one). Weights holding NaN/inf are never written (NonFiniteError)."""
        acc = self.accelerator
        self.check_finite_weights(f"checkpoint step_{self.step:07d}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = self.ckpt_dir / f"step_{self.step:07d}.pt"
            atomic_torch_save(self.checkpoint_state(), path)
            prune_checkpoints(self.ckpt_dir, path, self.config.train.keep_checkpoints)
            self.log(f"saved {path}")
        acc.wait_for_everyone()

    def export_ema(self):
        """Full inference state dict with the EMA weights (loads strictly like graph_nnet_ema.pth)."""
        state = {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()}
        for n, v in self.ema.items():
            state[n] = v.cpu().to(state[n].dtype)
        return state

    def find_checkpoint(self):
        """(path, state) of the checkpoint to resume from: rank 0 picks it (setting unusable files aside) and
        tells the other ranks, so every process resumes from the same file."""
        acc = self.accelerator
        path, state = None, None
        if acc.is_main_process:
            for folder in (self.run_dir, self.ckpt_dir):
                clean_stale_temps(folder)  # temp files of killed runs
            path, state = load_latest_checkpoint(self.ckpt_dir, self.log)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            path = broadcast_object_list([str(path) if path is not None else None])[0]
            if path is not None and not acc.is_main_process:
                path = Path(path)
                state = read_checkpoint(path)
        return (Path(path), state) if path is not None else (None, None)

    def check_resume_config(self, path, state):
        """Compares the checkpoint's config with this run's: RESUME_MAY_CHANGE keys pass (logged), any other
        difference raises BadInput naming the keys, both values, the checkpoint and how to start anew."""
        if not state.get("config"):
            self.log(f"warning: {path} records no config; resuming without checking it")
            return
        allowed, refused, unrecorded = config_changes(state["config"], stored_config(self.config))
        if refused:
            diffs = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, old, new in refused)
            raise BadInput(f"cannot resume from {path}: the config differs from the one the checkpoint was made "
                           f"with ({diffs}). Resume with the checkpoint's values, or start a new run with another "
                           f"--config.run_name or --config.output_dir (or delete {self.run_dir})")
        if allowed:
            self.log("resuming with changed settings (allowed on resume): "
                     + "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in allowed))
        if unrecorded:
            self.log(f"warning: {path} does not record {', '.join(k for k, _, _ in unrecorded)} (settings added "
                     f"since it was written); resuming with the current values")
        before = state.get("processes")
        if before is not None and int(before) != self.world:
            self.log(f"resuming on {self.world} processes (the checkpoint was written by {before}); the global "
                     f"batch is unchanged ({self.config.train.batch_size}), per-process randomness differs")

    def check_resume_inputs(self, path, state):
        """Compares the fingerprint of the token dataset and graphs the checkpoint was trained on with this run's:
        a change raises BadInput naming what changed, or is logged as a warning with allow_input_change."""
        if self.inputs is None:
            return
        if state.get("inputs") is None:
            self.log(f"warning: {path} records no fingerprint of its token dataset and graphs (written by older "
                     f"code); resuming without checking them")
            return
        changes = input_changes(state["inputs"], self.inputs, self.config)
        if not changes:
            return
        if self.allow_input_change:
            self.log(f"warning: resuming on changed inputs (allowed by --allow-input-change): {'; '.join(changes)}")
            return
        error = BadInput(f"cannot resume from {path}: what it was trained on changed since it was written: "
                         f"{'; '.join(changes)}. Restore them, pass --allow-input-change to continue on the new "
                         f"inputs (logged), or start a new run with another --config.run_name (or delete "
                         f"{self.run_dir})")
        error.reported_elsewhere = not self.accelerator.is_main_process  # one line for all processes
        raise error

    def resume(self):
        """Loads the newest usable checkpoint after checking its config; returns the step resumed from."""
        path, state = self.find_checkpoint()
        if state is not None:
            self.check_resume_config(path, state)
            reached, n_steps = int(state["step"]), self.config.train.n_steps
            if n_steps < reached:  # would rewrite the exported weights and record fewer steps than were trained
                raise BadInput(f"cannot resume from {path}: train.n_steps={n_steps} is below the checkpoint's step "
                               f"{reached}; pass --config.train.n_steps={reached} or more, or start a new run with "
                               f"another --config.run_name")
            self.check_resume_inputs(path, state)
            self.load_state(state)
            self.log(f"resumed from {path} (step {self.step})")
        return self.step

    # --- one step

    def step_generators(self, step):
        """Per-(seed, rank, step) randomness, so a resumed run repeats the uninterrupted one exactly."""
        seed = (self.config.seed * 1_000_003 + self.rank * 10_007 + step) % (2 ** 63)
        torch.manual_seed(seed)  # dropout
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def train_step(self):
        """One optimizer step. The loss (averaged over processes) and the gradient norm are checked first:
        a non-finite value raises NonFiniteError before the update is applied (in fp32 / bf16). With the fp16
        loss scaler an overflow skips the update instead (counted); more than train.max_skipped_steps skips in
        a row raise NonFiniteError."""
        t, acc = self.config.train, self.accelerator
        cfg = self.unwrapped.cfg
        gen = self.step_generators(self.step)
        idx = self.batches.indices(self.step)
        idx = idx[self.rank * self.micro_batch * t.grad_accum:(self.rank + 1) * self.micro_batch * t.grad_accum]
        lr = lr_at(self.step, t.lr, t.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=acc.device)
        masked = torch.zeros((), dtype=torch.float64, device=acc.device)  # read with the loss: no sync here
        for micro in range(t.grad_accum):
            rows = np.sort(idx[micro * self.micro_batch:(micro + 1) * self.micro_batch].numpy())
            # non_blocking: the host goes on queuing work instead of waiting for the last step's kernels
            ids = torch.from_numpy(np.asarray(self.tokens[rows]).astype(np.int64)).to(acc.device, non_blocking=True)
            cls = torch.from_numpy(np.asarray(self.labels[rows]).astype(np.int64)).to(acc.device, non_blocking=True)
            batch = make_masked_batch(ids, cls, cfg.mask_token_id, cfg.null_class_id, t.p_uncond,
                                      tuple(t.mask_beta), generator=gen, **masking_options(t))
            sync = micro == t.grad_accum - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                logits = self.model(batch.input_ids, batch.class_ids)
                loss = masked_token_loss(logits, batch, t.label_smoothing) / t.grad_accum
            acc.backward(loss)
            total_loss += loss.detach().float()
            masked += batch.mask.float().mean().double() / t.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))  # norms of the true gradients
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        else:
            norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            grad_norm = torch.norm(torch.stack(norms)) if norms else torch.zeros((), device=acc.device)
        # one collective: every process sees the same averaged loss and norm (NaN/inf anywhere spreads), so
        # all of them take the same decision
        checked = acc.reduce(torch.stack([total_loss.float(), grad_norm.detach().float().to(acc.device)]),
                             reduction="mean")
        # the step's one host read (a GPU sync): loss, gradient norm and this process's masked ratio together
        loss_value, norm_value, masked = torch.cat([checked.double(), masked.view(1)]).tolist()
        bad = [what for what, v in (("loss", loss_value), ("gradient norm", norm_value)) if not math.isfinite(v)]
        step = self.step + 1
        skipped = False
        if scaler is None:
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    f"step {step}: non-finite {' and '.join(bad)} (loss {loss_value}, gradient norm {norm_value}); "
                    f"stopped before applying the update. {self.last_checkpoint_hint()}")
            self.optimizer.step()
        else:
            self.optimizer.step()  # the loss scaler skips the update when the gradients overflowed
            skipped = bool(self.optimizer.step_was_skipped)
            if bad and not skipped:
                raise NonFiniteError(f"step {step}: non-finite {' and '.join(bad)} (loss {loss_value}) and the "
                                     f"fp16 loss scaler did not skip the update. {self.last_checkpoint_hint()}")
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.skipped_total += 1
            self.skipped_run += 1
            self.log(f"step {step}: the fp16 loss scaler skipped the update (gradient overflow; scale now "
                     f"{scaler.get_scale():.3g}; {self.skipped_run} in a row, {self.skipped_total} in all)")
            if self.skipped_run > t.max_skipped_steps:
                raise NonFiniteError(
                    f"step {step}: the fp16 loss scaler skipped {self.skipped_run} steps in a row (non-finite "
                    f"gradients at every scale down to {scaler.get_scale():.3g}); more than "
                    f"train.max_skipped_steps = {t.max_skipped_steps}, so the run is diverging. "
                    f"{self.last_checkpoint_hint()}")
        else:
            self.skipped_run = 0
            self.update_ema()
        self.step = step
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "masked_ratio": masked,
                "skipped_steps": self.skipped_total}

    @torch.no_grad()
    def update_ema(self):
        rate = self.config.train.ema_rate
        for n, p in self.unwrapped.named_parameters():
            if n in self.trained_set:
                self.ema[n].mul_(rate).add_(p.detach().float(), alpha=1 - rate)

    # --- loop

    def write_run_files(self, start_step: int):
        """Rank 0: the config of this segment (config.json for a run starting at step 0, else
        config_resume_<step>.json next to the earlier ones), and the logs cut back to `start_step`."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            name = "config.json" if start_step == 0 else f"config_resume_{start_step:07d}.json"
            atomic_write_json(self.run_dir / name, config_to_dict(self.config))
            for log_file in LOG_FILES:
                truncate_csv(self.run_dir / log_file, start_step)
            if self.inputs is not None:
                inputs_name = "inputs.json" if start_step == 0 else f"inputs_resume_{start_step:07d}.json"
                atomic_write_json(self.run_dir / inputs_name, self.inputs)
        self.accelerator.wait_for_everyone()

    def append_log(self, row):
        if self.accelerator.is_main_process:
            append_csv(self.run_dir / "log.csv", row)

    def fit(self, stop_after=None, eval_fn=None, crash_after_step=None):
        """Trains to train.n_steps (or `stop_after` steps in this call); checkpoints and exports EMA.

        Raises NonFiniteError at the first non-finite loss / gradient norm / weight (nothing non-finite is
        written), BadInput when the checkpoint to resume from was made with another config.
        """
        t, acc = self.config.train, self.accelerator
        start = self.resume()
        self.write_run_files(start)
        start_tracking(acc, self.tracking, self.run_dir, self.config.run_name, start + 1, config_to_dict(self.config))
        n_params = sum(p.numel() for n, p in self.unwrapped.named_parameters() if n in self.trained_set)
        self.log(f"mode {t.mode}: training {n_params:,} parameters ({len(self.trained_names)} tensors); "
                 f"global batch {t.batch_size} = {self.world} processes x {t.grad_accum} accumulation x "
                 f"{self.micro_batch} per micro-batch; mixed precision {self.precision}; run folder {self.run_dir}")
        end = t.n_steps if stop_after is None else min(t.n_steps, self.step + stop_after)
        bar = tqdm(total=t.n_steps, initial=self.step, disable=not acc.is_main_process, desc=self.config.run_name)
        tokens_per_step = t.batch_size * self.unwrapped.cfg.seq_len
        tick, tick_step = time.time(), self.step
        try:
            while self.step < end:
                stats = self.train_step()
                bar.update(1)
                # rows at fixed steps only, so a resumed run logs exactly the rows of an uninterrupted one
                if self.step % t.log_interval == 0 or self.step == t.n_steps:
                    now = time.time()
                    stats["tokens_per_s"] = tokens_per_step * (self.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, self.step
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                    self.append_log(stats)
                    log_train(acc, stats)
                if self.step % t.save_interval == 0 or self.step == t.n_steps:
                    self.save_checkpoint()
                if crash_after_step is not None and self.step == crash_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: a hard kill, nothing cleaned up
                if eval_fn is not None and t.fid_interval > 0 and self.step % t.fid_interval == 0:
                    eval_fn(self)
        finally:
            bar.close()
            end_tracking(acc)
        if self.step >= t.n_steps:
            self.check_finite_weights(EXPORT_NAME)
            if acc.is_main_process:
                path = self.run_dir / EXPORT_NAME
                save_weights(self.export_ema(), path, stored_config(self.config))  # .safetensors, config inside
                self.log(f"wrote EMA weights {path}")
        acc.wait_for_everyone()
        return self.step
