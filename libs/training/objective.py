"""The masked-token training objective of the NAT backbone (docs/reference.md#training-objective)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_SCHEDULES = ("beta", "cosine")  # train.mask_schedule: AutoNAT's Beta law, MaskGIT's cosine of a uniform
LOSS_AVERAGES = ("tokens", "samples")  # train.loss_average: over the batch's masked places, or per sample first

def sample_beta(n: int, a: float, b: float, generator=None, device="cpu") -> torch.Tensor:
    """n draws of Beta(a, b) from `generator`.

    Integer a, b use the exact order-statistic identity Beta(a,b) ~ a-th smallest of a+b-1 uniforms,
    so every draw comes from the torch generator (torch.distributions takes none).
    """
    if float(a).is_integer() and float(b).is_integer() and a >= 1 and b >= 1:
        u = torch.rand(n, int(a + b - 1), generator=generator, device=device)
        return u.sort(dim=1).values[:, int(a) - 1]
    raise ValueError(f"mask ratio Beta({a},{b}): only integer parameters >= 1 are supported")


def cosine_rate(u: torch.Tensor) -> torch.Tensor:
    """MaskGIT's training mask rate of uniform draws u [B] in [0, 1): clip(cos(pi/2 * u), 1e-6, 1), float32."""
    return torch.cos(u.float() * (math.pi / 2)).clamp(1e-6, 1.0)


def mask_rates(batch: int, schedule="beta", beta=(12, 3), min_rate=0.0, generator=None, device="cpu"):
    """Per-sample mask rates [B] in [0, 1]: r ~ Beta(beta) ('beta') or cosine_rate(U[0, 1)) ('cosine'), raised
    to at least `min_rate` (MaskGIT's min_masking_rate; 0 leaves r as drawn). ValueError for another schedule."""
    if schedule == "beta":
        r = sample_beta(batch, beta[0], beta[1], generator, device)
    elif schedule == "cosine":
        r = cosine_rate(torch.rand(batch, generator=generator, device=device))
    else:
        raise ValueError(f"unknown mask schedule '{schedule}' ({' or '.join(MASK_SCHEDULES)})")
    return r.clamp(min=min_rate) if min_rate > 0 else r


def random_mask(batch: int, seq_len: int, beta=(12, 3), generator=None, device="cpu", schedule="beta",
                min_rate=0.0) -> torch.Tensor:
    """Bool mask [B,L]: per sample a rate r (mask_rates), round(L*r) positions (at least 1) chosen uniformly."""
    r = mask_rates(batch, schedule, beta, min_rate, generator, device)
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
    average: str = "tokens"   # how masked_token_loss averages: LOSS_AVERAGES


def make_masked_batch(ids, class_ids, mask_token_id, null_class_id, p_uncond=0.15, beta=(12, 3),
                      generator=None, schedule="beta", min_rate=0.0, average="tokens") -> MaskedBatch:
    """Masks ids (docs/reference.md#training-objective) and drops labels for classifier-free guidance.

    `schedule`, `min_rate`: the mask rate law (mask_rates); `average`: how the loss of the batch averages."""
    if average not in LOSS_AVERAGES:
        raise ValueError(f"unknown loss average '{average}' ({' or '.join(LOSS_AVERAGES)})")
    ids = ids.long()
    mask = random_mask(ids.shape[0], ids.shape[1], beta, generator, ids.device, schedule, min_rate)
    input_ids = torch.where(mask, torch.full_like(ids, mask_token_id), ids)
    class_ids = drop_labels(class_ids.long().view(-1), p_uncond, null_class_id, generator)
    return MaskedBatch(input_ids, class_ids, ids, mask, average)


def masking_options(train_cfg) -> dict:
    """make_masked_batch's schedule / min_rate / average from a config's train block (absent keys: AutoNAT's)."""
    return {"schedule": train_cfg.get("mask_schedule", "beta"), "min_rate": float(train_cfg.get("min_mask_rate", 0.0)),
            "average": train_cfg.get("loss_average", "tokens")}


IGNORED = -100  # target of the places the loss skips (F.cross_entropy's ignore_index)


def masked_token_loss(logits, batch: MaskedBatch, label_smoothing=0.1):
    """Cross-entropy (label smoothing) of logits [B,L,K] on the masked places only: a 0-d float32 tensor.

    batch.average 'tokens': the mean over every masked place of the batch (AutoNAT); 'samples': each sample's
    mean over its masked places, then the mean over samples (MaskGIT's weighted sequence loss). Label smoothing
    is torch's (and MaskGIT's): target 1 - s + s/K on the true code, s/K on the others. The unmasked places get
    the ignored target instead of being selected out: no shape depends on the mask, so the loss needs no host
    read on a GPU.
    """
    targets = torch.where(batch.mask, batch.targets, torch.full_like(batch.targets, IGNORED))  # [B,L]
    if batch.average == "tokens":
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORED,
                               label_smoothing=label_smoothing)
    per_place = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORED,
                                label_smoothing=label_smoothing, reduction="none").view(targets.shape)  # [B,L]
    counts = batch.mask.sum(1).clamp(min=1)  # [B] masked places per sample (per_place is 0 at the others)
    return (per_place.sum(1) / counts).mean()
