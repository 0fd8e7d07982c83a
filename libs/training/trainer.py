"""Training loop of train_graph.py: pretrain (backbone) or ka_mig (graph modules on a frozen backbone)."""
import contextlib
import csv
import json
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from libs.atomic_io import atomic_torch_save, atomic_write
from libs.checkpoint import load_state_dict_file, load_strict
from libs.config import config_to_dict
from libs.models.factory import build_model
from libs.training.objective import make_masked_batch, masked_token_loss

# ----------------------------------------------------------------------------- model

MODE_MODEL = {"pretrain": "autonat", "ka_mig": "ka_mig"}  # train.mode -> the model kind it trains
TRAINED_PREFIXES = {"pretrain": ("",), "ka_mig": ("graph_layer.", "mlm_layer.")}  # '' = every parameter


def check_mode(mode: str):
    """Raises ValueError for an unknown train.mode."""
    if mode not in MODE_MODEL:
        raise ValueError(f"unknown train.mode '{mode}' ({' or '.join(MODE_MODEL)})")


def init_model(config, graphs: dict = None):
    """The model `train.mode` trains: a fresh AutoNAT (pretrain) or KA-MIG on `train.init_checkpoint` (ka_mig).

    A KA-MIG run loads the backbone strictly with its graph modules left at their (zero-fusion) init.
    Raises ValueError when ka_mig mode has no init_checkpoint, MissingAssetError when the file is absent.
    """
    mode = config.train.mode
    check_mode(mode)
    model = build_model(config, MODE_MODEL[mode], graphs)
    init = config.train.init_checkpoint
    if init:
        allow = ("graph_layer.",) if mode == "ka_mig" else ()
        load_strict(model, load_state_dict_file(init), source=init, allow_missing=allow)
    elif mode == "ka_mig":
        raise ValueError("train.mode=ka_mig needs the frozen backbone: set config.train.init_checkpoint "
                         "(default assets/nnet_ema.pth)")
    return model


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


# ----------------------------------------------------------------------------- checkpoints


def append_csv(path: Path, row: dict):
    """Appends one row to a CSV log (header on first write)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def list_checkpoints(ckpt_dir: Path):
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)


def load_latest_checkpoint(ckpt_dir: Path, log=print):
    """The newest checkpoint that loads; truncated or corrupt ones are skipped with a warning."""
    for path in list_checkpoints(ckpt_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("no 'step' entry")
            return path, state
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None, None


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Runs `config.train` with accelerate (DDP, mixed precision), EMA, exact resume, rank-0 logging."""

    def __init__(self, config, tokens, labels, graphs=None, model=None):
        t = config.train
        self.config = config
        precision = t.mixed_precision
        if precision == "fp16" and not torch.cuda.is_available():
            warnings.warn("fp16 mixed precision needs a GPU; training in float32 on this CPU")
            precision = "no"
        self.precision = precision
        self.accelerator = acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.rank, self.world = acc.process_index, acc.num_processes
        per_step = self.world * t.grad_accum
        if t.batch_size % per_step:
            raise ValueError(f"train.batch_size {t.batch_size} (global) must divide by processes x grad_accum "
                             f"= {self.world} x {t.grad_accum}")
        self.micro_batch = t.batch_size // per_step
        self.run_dir = Path(config.output_dir) / config.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tokens, self.labels = tokens, labels
        self.batches = StepBatches(len(tokens), t.batch_size, config.seed)

        if model is None:
            torch.manual_seed(config.seed)  # same initialisation on every rank and in every run
            model = init_model(config, graphs)
        self.trained_names = freeze_for_mode(model, t.mode)
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

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def log(self, msg):
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    # --- state

    def trained_state(self):
        return {n: p.detach().cpu().clone() for n, p in self.unwrapped.named_parameters() if n in self.trained_set}

    def checkpoint_state(self):
        scaler = self.accelerator.scaler
        return {"model": self.trained_state(),
                "ema": {n: v.cpu().clone() for n, v in self.ema.items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": self.step,
                "config": config_to_dict(self.config),
                "trained_params": list(self.trained_names),
                "rng": {"scheme": "every step reseeds from (seed, rank, step)", "seed": self.config.seed,
                        "torch": torch.get_rng_state()}}

    def load_state(self, state):
        missing = set(self.trained_names) - set(state["model"])
        if missing:
            raise ValueError(f"checkpoint does not hold the trained parameters {sorted(missing)[:5]} "
                             f"(was it made with another train.mode?)")
        with torch.no_grad():
            for n, p in self.unwrapped.named_parameters():
                if n in self.trained_set:
                    p.copy_(state["model"][n])
        self.ema = {n: state["ema"][n].to(self.accelerator.device).float().clone() for n in self.trained_names}
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def save_checkpoint(self):
        """Rank 0 writes step_<n>.pt atomically; older ones beyond keep_checkpoints are removed."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = self.ckpt_dir / f"step_{self.step:07d}.pt"
            atomic_torch_save(self.checkpoint_state(), path)
            for old in list_checkpoints(self.ckpt_dir)[self.config.train.keep_checkpoints:]:
                old.unlink()
            self.log(f"saved {path}")
        acc.wait_for_everyone()

    def export_ema(self):
        """Full inference state dict with the EMA weights (loads strictly like graph_nnet_ema.pth)."""
        state = {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()}
        for n, v in self.ema.items():
            state[n] = v.cpu().to(state[n].dtype)
        return state

    def resume(self):
        path, state = load_latest_checkpoint(self.ckpt_dir, self.log)
        if state is not None:
            self.load_state(state)
            self.log(f"resumed from {path} (step {self.step})")

    # --- one step

    def step_generators(self, step):
        """Per-(seed, rank, step) randomness, so a resumed run repeats the uninterrupted one exactly."""
        seed = (self.config.seed * 1_000_003 + self.rank * 10_007 + step) % (2 ** 63)
        torch.manual_seed(seed)  # dropout
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def train_step(self):
        t, acc = self.config.train, self.accelerator
        cfg = self.unwrapped.cfg
        gen = self.step_generators(self.step)
        idx = self.batches.indices(self.step)
        idx = idx[self.rank * self.micro_batch * t.grad_accum:(self.rank + 1) * self.micro_batch * t.grad_accum]
        lr = lr_at(self.step, t.lr, t.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss, masked = torch.zeros((), device=acc.device), 0.0
        for micro in range(t.grad_accum):
            rows = np.sort(idx[micro * self.micro_batch:(micro + 1) * self.micro_batch].numpy())
            ids = torch.from_numpy(np.asarray(self.tokens[rows]).astype(np.int64)).to(acc.device)
            cls = torch.from_numpy(np.asarray(self.labels[rows]).astype(np.int64)).to(acc.device)
            batch = make_masked_batch(ids, cls, cfg.mask_token_id, cfg.null_class_id, t.p_uncond,
                                      tuple(t.mask_beta), generator=gen)
            sync = micro == t.grad_accum - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                logits = self.model(batch.input_ids, batch.class_ids)
                loss = masked_token_loss(logits, batch, t.label_smoothing) / t.grad_accum
            acc.backward(loss)
            total_loss += loss.detach()
            masked += float(batch.mask.float().mean()) / t.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        if acc.sync_gradients and t.grad_clip > 0:
            grad_norm = acc.clip_grad_norm_(params, t.grad_clip)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.step += 1
        loss = acc.reduce(total_loss, reduction="mean")
        return {"step": self.step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                "masked_ratio": masked}

    @torch.no_grad()
    def update_ema(self):
        rate = self.config.train.ema_rate
        for n, p in self.unwrapped.named_parameters():
            if n in self.trained_set:
                self.ema[n].mul_(rate).add_(p.detach().float(), alpha=1 - rate)

    # --- loop

    def write_run_files(self):
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config_to_dict(self.config), indent=2)
            atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))

    def append_log(self, row):
        if self.accelerator.is_main_process:
            append_csv(self.run_dir / "log.csv", row)

    def fit(self, stop_after=None, eval_fn=None, crash_after_step=None):
        """Trains to train.n_steps (or `stop_after` steps in this call); checkpoints and exports EMA."""
        t, acc = self.config.train, self.accelerator
        self.write_run_files()
        self.resume()
        n_params = sum(p.numel() for n, p in self.unwrapped.named_parameters() if n in self.trained_set)
        self.log(f"mode {t.mode}: training {n_params:,} parameters ({len(self.trained_names)} tensors); "
                 f"global batch {t.batch_size} = {self.world} processes x {t.grad_accum} accumulation x "
                 f"{self.micro_batch} per micro-batch; mixed precision {self.precision}; run folder {self.run_dir}")
        end = t.n_steps if stop_after is None else min(t.n_steps, self.step + stop_after)
        bar = tqdm(total=t.n_steps, initial=self.step, disable=not acc.is_main_process, desc=self.config.run_name)
        tokens_per_step = t.batch_size * self.unwrapped.cfg.seq_len
        tick = time.time()
        while self.step < end:
            stats = self.train_step()
            bar.update(1)
            if self.step % t.log_interval == 0 or self.step == end:
                now = time.time()
                steps = t.log_interval if self.step % t.log_interval == 0 else (self.step % t.log_interval)
                stats["tokens_per_s"] = tokens_per_step * steps / max(now - tick, 1e-9)
                tick = now
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                self.append_log(stats)
            if self.step % t.save_interval == 0 or self.step == t.n_steps:
                self.save_checkpoint()
            if crash_after_step is not None and self.step == crash_after_step:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a hard kill, nothing cleaned up
            if eval_fn is not None and t.fid_interval > 0 and self.step % t.fid_interval == 0:
                eval_fn(self)
        bar.close()
        if self.step >= t.n_steps:
            if acc.is_main_process:
                path = self.run_dir / "model_ema.pth"
                atomic_torch_save(self.export_ema(), path)
                self.log(f"wrote EMA weights {path}")
        acc.wait_for_everyone()
        return self.step

