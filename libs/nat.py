"""Non-autoregressive transformer (NAT) training objective and parallel decoding (SPEC §3-4)."""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- training


def sample_beta(n: int, a: float, b: float, generator=None, device="cpu") -> torch.Tensor:
    """n draws of Beta(a, b) from `generator`.

    Integer a, b use the exact order-statistic identity Beta(a,b) ~ a-th smallest of a+b-1 uniforms,
    so every draw comes from the torch generator (torch.distributions takes none).
    """
    if float(a).is_integer() and float(b).is_integer() and a >= 1 and b >= 1:
        u = torch.rand(n, int(a + b - 1), generator=generator, device=device)
        return u.sort(dim=1).values[:, int(a) - 1]
    raise ValueError(f"mask ratio Beta({a},{b}): only integer parameters >= 1 are supported")


def random_mask(batch: int, seq_len: int, beta=(12, 3), generator=None, device="cpu") -> torch.Tensor:
    """Bool mask [B,L]: per sample r ~ Beta, round(L*r) positions (at least 1) chosen uniformly."""
    r = sample_beta(batch, beta[0], beta[1], generator, device)
    n_mask = torch.round(seq_len * r).long().clamp(1, seq_len)  # [B]
    scores = torch.rand(batch, seq_len, generator=generator, device=device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order
    return rank < n_mask[:, None]


def drop_labels(class_ids: torch.Tensor, p_uncond: float, null_class_id: int, generator=None):
    """Replaces each class id by the null class with probability p_uncond."""
    drop = torch.rand(class_ids.shape, generator=generator, device=class_ids.device) < p_uncond
    return torch.where(drop, torch.full_like(class_ids, null_class_id), class_ids)


@dataclass
class MaskedBatch:
    """Inputs and targets of one NAT training step."""
    input_ids: torch.Tensor   # [B,L] with masked places = mask_token_id
    class_ids: torch.Tensor   # [B] with dropped labels = null class
    targets: torch.Tensor     # [B,L] original ids
    mask: torch.Tensor        # [B,L] bool, True where the loss is taken


def make_masked_batch(ids, class_ids, mask_token_id, null_class_id, p_uncond=0.15, beta=(12, 3),
                      generator=None) -> MaskedBatch:
    """Masks ids per SPEC §3 and drops labels for classifier-free guidance."""
    ids = ids.long()
    mask = random_mask(ids.shape[0], ids.shape[1], beta, generator, ids.device)
    input_ids = torch.where(mask, torch.full_like(ids, mask_token_id), ids)
    class_ids = drop_labels(class_ids.long().view(-1), p_uncond, null_class_id, generator)
    return MaskedBatch(input_ids, class_ids, ids, mask)


def masked_token_loss(logits, batch: MaskedBatch, label_smoothing=0.1):
    """Cross-entropy (label smoothing) averaged over the masked places only."""
    return F.cross_entropy(logits[batch.mask].float(), batch.targets[batch.mask],
                           label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- sampling

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
