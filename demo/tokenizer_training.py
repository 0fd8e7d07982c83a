"""Training a small VQGAN (libs.models.vqgan.VQGAN) from scratch: reconstruction + codebook/commitment loss, k-means init.

The quantiser is the usual VQ-VAE one: z_q = z + sg(e - z) (straight-through), loss
  |x - D(z_q)|^2 + |sg(z) - e|^2 + beta |z - sg(e)|^2.
Codes start from k-means over encoder outputs, and codes unused for `restart_interval` steps are moved
onto random encoder outputs, so the codebook does not collapse. No GAN or perceptual loss: enough for
the demo's 32x32 images, not for ImageNet.
"""
import math
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from demo.pipeline import shown_path
from libs.atomic_io import atomic_write_json
from libs.checkpoint import save_weights
from libs.config import config_to_dict
from libs.data.images import list_image_folder, load_image_file
from libs.models.factory import tokenizer_config
from libs.models.vqgan import VQGAN


@dataclass
class TokenizerTrainConfig:
    """Optimisation settings of `train_tokenizer`; the values live in configs/demo.py (`tokenizer_train`)."""
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    beta: float                     # commitment weight
    kmeans_images: int              # images whose encoder outputs seed the codebook
    kmeans_iters: int
    restart_interval: int           # steps between dead-code restarts; 0 = never
    flip: bool                      # random horizontal flips (the token datasets store flipped rows too)
    seed: int
    log_interval: int


def train_config(cfg) -> TokenizerTrainConfig:
    """TokenizerTrainConfig from a config's `tokenizer_train` block (TypeError on a missing or unknown key)."""
    return TokenizerTrainConfig(**dict(cfg))


def to_float(images_u8: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).to(device).permute(0, 3, 1, 2).float() / 255.0


def flat_latents(z: torch.Tensor) -> torch.Tensor:
    """[B,D,h,w] -> [B*h*w,D]."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def nearest_codes(flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of codes [K,D] for each row of flat [M,D] (squared L2)."""
    return ((codes * codes).sum(1)[None] - 2.0 * flat @ codes.t()).argmin(1)


def vq_forward(model: VQGAN, x: torch.Tensor, beta: float):
    """x [B,3,H,W] in [0,1] -> (recon [B,3,H,W], ids [B,h,w], {'recon','codebook','commit'} losses)."""
    z = model.encoder(x)  # [B,D,h,w]
    B, D, h, w = z.shape
    codes = model.quantize.embedding.weight  # [K,D]
    ids = nearest_codes(flat_latents(z).detach(), codes.detach()).view(B, h, w)
    zq = model.quantize.lookup(ids)  # [B,D,h,w], gradient flows into the codebook
    codebook = F.mse_loss(zq, z.detach())
    commit = F.mse_loss(z, zq.detach())
    recon = model.decoder(z + (zq - z).detach())  # straight-through estimator
    return recon, ids, {"recon": F.mse_loss(recon, x), "codebook": codebook, "commit": beta * commit}


@torch.no_grad()
def kmeans_init(model: VQGAN, images: torch.Tensor, iters: int, generator: torch.Generator):
    """Sets the codebook to k-means centres of the encoder outputs of `images` [n,3,H,W]."""
    flat = flat_latents(model.encoder(images)).float()  # [M,D]
    K = model.codebook_size
    pick = torch.randperm(flat.shape[0], generator=generator)[:K]
    if pick.numel() < K:  # fewer latents than codes: repeat with small noise
        pick = torch.randint(0, flat.shape[0], (K,), generator=generator)
    centres = flat[pick].clone()  # [K,D]
    centres += 1e-3 * flat.std() * torch.randn(centres.shape, generator=generator)
    for _ in range(iters):
        assign = nearest_codes(flat, centres)  # [M]
        sums = torch.zeros_like(centres).index_add_(0, assign, flat)
        counts = torch.bincount(assign, minlength=K).float()[:, None]
        empty = counts[:, 0] == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1))
        if empty.any():  # re-seed empty clusters on random latents
            centres[empty] = flat[torch.randint(0, flat.shape[0], (int(empty.sum()),), generator=generator)]
    model.quantize.embedding.weight.copy_(centres)


@torch.no_grad()
def restart_dead_codes(model: VQGAN, usage: torch.Tensor, latents: torch.Tensor, generator) -> int:
    """Moves codes with usage 0 onto random rows of latents [M,D]; returns how many moved."""
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0:
        return 0
    rows = torch.randint(0, latents.shape[0], (dead.numel(),), generator=generator)
    weight = model.quantize.embedding.weight
    noise = 1e-2 * latents.std() * torch.randn((dead.numel(), latents.shape[1]), generator=generator)
    weight[dead] = latents[rows].to(weight.dtype) + noise
    return int(dead.numel())


def lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_tokenizer(model: VQGAN, images: np.ndarray, cfg: TokenizerTrainConfig, progress: bool = True,
                    log=None) -> list:
    """Trains `model` in place on uint8 images [N,H,W,3]; returns the logged rows (step, losses, usage)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != model.cfg.resolution:
        raise ValueError(f"images must be uint8 [N,{model.cfg.resolution},{model.cfg.resolution},3], "
                         f"got {images.shape}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    first = torch.randperm(len(images), generator=gen)[:cfg.kmeans_images].sort().values.numpy()
    kmeans_init(model, to_float(images[first]), cfg.kmeans_iters, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    K = model.codebook_size
    usage = torch.zeros(K, dtype=torch.long)  # code counts since the last restart
    history, running = [], {}
    bar = tqdm(range(cfg.steps), desc="tokenizer", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen).sort().values.numpy()
        x = to_float(images[idx])  # [B,3,H,W]
        if cfg.flip:
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        recon, ids, losses = vq_forward(model, x, cfg.beta)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(ids.flatten(), minlength=K)
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        restarted = 0
        if cfg.restart_interval and (step + 1) % cfg.restart_interval == 0 and step + 1 < cfg.steps:
            with torch.no_grad():
                latents = flat_latents(model.encoder(x))
            restarted = restart_dead_codes(model, usage, latents, gen)
            usage.zero_()
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps:
            n = cfg.log_interval if (step + 1) % cfg.log_interval == 0 else (step + 1) % cfg.log_interval
            row = {"step": step + 1, "lr": lr_at(step, cfg), **{k: v / n for k, v in running.items()},
                   "codes_used_in_batch": int(ids.unique().numel()), "restarted": restarted}
            history.append(row)
            running = {}
            bar.set_postfix(recon=f"{row['recon']:.4f}", codes=row["codes_used_in_batch"])
            if log is not None:
                log(row)
    model.eval()
    return history


@torch.no_grad()
def reconstruction_mse(model: VQGAN, images: np.ndarray, batch_size: int = 256) -> float:
    """Mean squared error in [0,1] of encode -> decode (the real quantised path) over uint8 images [N,H,W,3]."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(images), batch_size):
        x = to_float(images[s:s + batch_size])
        total += float(((model.decode(model.encode(x)) - x) ** 2).sum())
        count += x.numel()
    return total / max(count, 1)


@torch.no_grad()
def code_usage(model: VQGAN, images: np.ndarray, batch_size: int = 256) -> dict:
    """{'codes_used', 'perplexity'} of the tokens of uint8 images [N,H,W,3]."""
    counts = torch.zeros(model.codebook_size)
    for s in range(0, len(images), batch_size):
        ids = model.encode(to_float(images[s:s + batch_size]))
        counts += torch.bincount(ids.flatten(), minlength=model.codebook_size).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"codes_used": int((counts > 0).sum()), "perplexity": math.exp(entropy)}


def save_tokenizer(model: VQGAN, path, extra: dict = None):
    """Writes the weights as .safetensors (atomic, byte-reproducible) with {'tokenizer': the model's config,
    ...extra} as JSON under the metadata key 'config'; loads with libs.models.factory.load_tokenizer."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return save_weights(state, path, {"tokenizer": model.config_dict(), **(extra or {})})


def load_image_split(root, resolution: int) -> np.ndarray:
    """All images of an ImageFolder split as uint8 [N,R,R,3] (ADM center crop to `resolution`)."""
    root = Path(root)
    _, items = list_image_folder(root)
    return np.stack([load_image_file(root / rel, resolution) for rel, _ in items])


def run_tokenizer_training(config, data_dir, val_dir, out_path) -> dict:
    """demo/train_tokenizer.py: builds config.tokenizer's VQGAN, trains it on data_dir, saves weights + report."""
    t0 = time.time()
    cfg = train_config(config.tokenizer_train)
    tok_cfg = tokenizer_config(config.tokenizer)
    images = load_image_split(data_dir, tok_cfg.resolution)  # [N,R,R,3]
    val = load_image_split(val_dir, tok_cfg.resolution) if val_dir is not None else images[:256]
    torch.manual_seed(cfg.seed)
    model = VQGAN(tok_cfg)
    print(f"tokenizer: {sum(p.numel() for p in model.parameters()):,} parameters, {tok_cfg.resolution}px -> "
          f"{model.grid_size}x{model.grid_size} tokens of {tok_cfg.codebook_size} codes; {len(images)} training images")
    before = reconstruction_mse(model, val)
    history = train_tokenizer(model, images, cfg)
    report = {"recon_mse_before": before, "recon_mse_after": reconstruction_mse(model, val),
              **code_usage(model, val),
              "eval_images": shown_path(val_dir) if val_dir is not None else f"{shown_path(data_dir)} (first 256)",
              "train_images": len(images)}
    save_tokenizer(model, out_path, {"train": asdict(cfg)})
    # no wall time in the sidecar: the same training gives the same bytes (the time is printed below)
    atomic_write_json(Path(str(out_path) + ".json"), {"report": report, "train": asdict(cfg),
                                                      "tokenizer": config_to_dict(config.tokenizer),
                                                      "history": history}, indent=1, sort_keys=False)
    print(f"reconstruction MSE {report['recon_mse_before']:.4f} -> {report['recon_mse_after']:.4f}, "
          f"{report['codes_used']} codes used (perplexity {report['perplexity']:.1f}) -> {out_path} "
          f"in {time.time() - t0:.0f} s")
    return report
