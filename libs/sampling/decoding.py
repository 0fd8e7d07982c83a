"""Parallel decoding of masked-token models: schedules and iterative re-masking (docs/reference.md#decoding)."""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

RATIO_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Schedule:
    """Per-step decoding parameters; ratio and conf_temp have T-1 entries (the last step has 0).

    `ratio_dtype` ("float32" or "float64", a string so that the schedule stays JSON-serialisable) is the
    precision of the re-mask count floor(seq_len * ratio): float32 for the MaskGIT cosine schedule (whose
    ratios are float32 values, as in the reference arithmetic), float64 otherwise.
    """
    ratios: List[float]
    conf_temps: List[float]
    sample_temps: List[float]
    guidance: List[float]
    ratio_dtype: str = "float64"

    @property
    def steps(self) -> int:
        return len(self.sample_temps)

    def __post_init__(self):
        T = len(self.sample_temps)
        if not (len(self.ratios) == len(self.conf_temps) == T - 1 and len(self.guidance) == T):
            raise ValueError(f"schedule lengths must be ratios/conf_temps T-1, sample_temps/guidance T; got "
                             f"{len(self.ratios)}, {len(self.conf_temps)}, {T}, {len(self.guidance)}")
        if self.ratio_dtype not in RATIO_DTYPES:
            raise ValueError(f"ratio_dtype must be one of {sorted(RATIO_DTYPES)}, got {self.ratio_dtype!r}")


def maskgit_schedule(steps: int, guidance_scale: float, temp: float = 4.5) -> Schedule:
    """MaskGIT cosine schedule: ratio cos(pi/2 (t+1)/T), conf temp temp*(1-(t+1)/T), guidance 0 -> scale.

    The ratios are computed in float32 like the reference: (t+1)/T rounded to float32, times pi/2 and
    the cosine in float32; the re-mask count floor(seq_len * ratio) is then also taken in float32
    (`ratio_dtype`). This matters: at (t+1)/T = 2/3 the float32 cosine is 0.49999997, so 256 tokens
    give 127 re-masked where float64 gives 128. The guidance is torch.linspace(0, scale, T), so
    T = 1 has guidance [0].
    """
    t = torch.arange(steps, dtype=torch.float64)
    progress = ((t + 1) / steps).to(torch.float32)  # [T] (t+1)/T rounded to float32
    ratios = torch.cos(math.pi / 2 * progress)[:-1].tolist()  # float32 arithmetic
    conf = (temp * (1 - (t + 1) / steps))[:-1].tolist()
    guid = torch.linspace(0, guidance_scale, steps, dtype=torch.float64).tolist()  # [0] when steps == 1
    return Schedule(ratios, conf, [1.0] * steps, guid, ratio_dtype="float32")


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


def remask_count(seq_len: int, ratio: float, dtype: str = "float64") -> int:
    """floor(seq_len * ratio) with both factors and the product in `dtype` (float32: the reference's count)."""
    dt = RATIO_DTYPES[dtype]
    return int(torch.floor(torch.tensor(seq_len, dtype=dt) * torch.tensor(ratio, dtype=dt)))


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
            n = max(1, min(n_masked - 1, remask_count(seq_len, schedule.ratios[t], schedule.ratio_dtype)))
            lowest = conf.topk(n, dim=-1, largest=False).indices  # [B,n]
            ids = sampled.scatter(1, lowest, mask_token_id)
        if record is not None:
            record.append(ids.clone())
    return ids
