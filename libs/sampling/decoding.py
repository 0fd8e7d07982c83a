"""Parallel decoding of masked-token models: schedules and iterative re-masking (docs/reference.md#decoding)."""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

@dataclass
class Schedule:
    """Per-step decoding parameters; ratio and conf_temp have T-1 entries (the last step has 0)."""
    ratios: List[float]
    conf_temps: List[float]
    sample_temps: List[float]
    guidance: List[float]

    @property
    def steps(self) -> int:
        return len(self.sample_temps)

    def __post_init__(self):
        T = len(self.sample_temps)
        if not (len(self.ratios) == len(self.conf_temps) == T - 1 and len(self.guidance) == T):
            raise ValueError(f"schedule lengths must be ratios/conf_temps T-1, sample_temps/guidance T; got "
                             f"{len(self.ratios)}, {len(self.conf_temps)}, {T}, {len(self.guidance)}")


def maskgit_schedule(steps: int, guidance_scale: float, temp: float = 4.5) -> Schedule:
    """MaskGIT cosine schedule: ratio cos(pi/2 (t+1)/T), conf temp temp*(1-(t+1)/T), guidance 0 -> scale."""
    t = torch.arange(steps, dtype=torch.float64)
    ratios = torch.cos(math.pi / 2 * (t + 1) / steps)[:-1].tolist()
    conf = (temp * (1 - (t + 1) / steps))[:-1].tolist()
    guid = (torch.linspace(0, guidance_scale, steps, dtype=torch.float64)
            if steps > 1 else torch.tensor([guidance_scale], dtype=torch.float64)).tolist()
    return Schedule(ratios, conf, [1.0] * steps, guid)


def schedule_from_config(cfg) -> Schedule:
    """Builds a Schedule from a config `sample` block (`schedule: autonat|maskgit`)."""
    if cfg.schedule == "autonat":
        return Schedule(list(cfg.ratios), list(cfg.conf_temps), list(cfg.sample_temps), list(cfg.guidance))
    if cfg.schedule == "maskgit":
        return maskgit_schedule(cfg.steps, cfg.cfg_scale, cfg.temp)
    raise ValueError(f"unknown schedule '{cfg.schedule}' (autonat or maskgit)")


def uniform(shape, generator, device):
    """U(0,1) noise; `generator` may be one torch.Generator or a list with one per batch row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def gumbel(shape, generator, device):
    u = uniform(shape, generator, device).clamp_(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))  # standard Gumbel(0, 1)


def guided_logits(model: Callable, ids, class_ids, scale: float, null_class_id: int):
    """cond + scale * (cond - uncond), with [cond; uncond] in one batched forward."""
    B = ids.shape[0]
    both_ids = torch.cat([ids, ids])
    both_cls = torch.cat([class_ids, torch.full_like(class_ids, null_class_id)])
    logits = model(both_ids, both_cls).float()
    cond, uncond = logits[:B], logits[B:]
    return cond + scale * (cond - uncond)


@torch.no_grad()
def generate(model: Callable, class_ids: torch.Tensor, schedule: Schedule, *, seq_len: int,
             mask_token_id: int, null_class_id: int, generator: Optional[torch.Generator] = None,
             record: Optional[list] = None) -> torch.Tensor:
    """Parallel decoding from all-[MASK]; returns ids [B,L] in [0, K). `record` gets ids after each step.

    `generator`: one torch.Generator for the batch, or a list of one per sample (per-index seeding:
    a sample's noise then does not depend on which other samples share its batch).
    """
    class_ids = class_ids.view(-1).long()
    B, device = class_ids.shape[0], class_ids.device
    ids = torch.full((B, seq_len), mask_token_id, dtype=torch.long, device=device)
    T = schedule.steps
    for t in range(T):
        logits = guided_logits(model, ids, class_ids, schedule.guidance[t], null_class_id)  # [B,L,K]
        is_masked = ids == mask_token_id
        temp = max(schedule.sample_temps[t], 1e-4)
        sampled = (logits / temp + gumbel(logits.shape, generator, device)).argmax(-1)  # Categorical
        sampled = torch.where(is_masked, sampled, ids)
        if t == T - 1:
            ids = sampled
        else:
            conf = torch.log_softmax(logits, dim=-1).gather(-1, sampled[..., None])[..., 0]  # [B,L]
            conf = torch.where(is_masked, conf, torch.full_like(conf, math.inf))
            conf = conf + schedule.conf_temps[t] * gumbel(conf.shape, generator, device)
            n_masked = int(is_masked[0].sum())
            n = max(1, min(n_masked - 1, math.floor(seq_len * schedule.ratios[t])))
            lowest = conf.topk(n, dim=-1, largest=False).indices  # [B,n]
            ids = sampled.scatter(1, lowest, mask_token_id)
        if record is not None:
            record.append(ids.clone())
    return ids
