"""The masked-token training objective of the NAT backbone (docs/reference.md#training-objective)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """Masks ids (docs/reference.md#training-objective) and drops labels for classifier-free guidance."""
    ids = ids.long()
    mask = random_mask(ids.shape[0], ids.shape[1], beta, generator, ids.device)
    input_ids = torch.where(mask, torch.full_like(ids, mask_token_id), ids)
    class_ids = drop_labels(class_ids.long().view(-1), p_uncond, null_class_id, generator)
    return MaskedBatch(input_ids, class_ids, ids, mask)


IGNORED = -100  # target of the places the loss skips (F.cross_entropy's ignore_index)


def masked_token_loss(logits, batch: MaskedBatch, label_smoothing=0.1):
    """Cross-entropy (label smoothing) of logits [B,L,K] averaged over the masked places only.

    The unmasked places get the ignored target instead of being selected out: no shape depends on the mask,
    so the loss needs no host read on a GPU.
    """
    targets = torch.where(batch.mask, batch.targets, torch.full_like(batch.targets, IGNORED))  # [B,L]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORED,
                           label_smoothing=label_smoothing)
