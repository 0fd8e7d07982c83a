"""The official MaskGIT sampler: iterative parallel decoding with the cosine mask schedule
(docs/reference.md#maskgit, "Sampler").

Step t = start_iter .. T-1, from ids [B,L] whose unknown places hold [MASK] (n0 of them per sample at the start):

1. logits [B,L,K] of the current ids (guided when a guidance scale is given for the step; the release has none);
2. sampled = argmax(logits + g), g ~ Gumbel(0,1) (a categorical draw; `sample_temperature` divides the logits,
   0 means argmax: the deterministic limit; the release always uses 1); known places keep their ids;
3. last step: the result is `sampled`. Otherwise, with r = (t+1)/T in float32:
   mask ratio m = clip(cos(pi/2 * r), 1e-6, 1) (float32); n = max(1, min(#masked - 1, floor(n0 * m)));
   confidence c = log(softmax(logits)[sampled]) + choice_temperature * (1 - r) * g' (fresh Gumbel noise g',
   +inf at known places); the places with c strictly below the n-th smallest c (0-based) become [MASK] again.

Everything is float32 as in the release. The strict "below the cut-off" keeps tied places unmasked, as the release
does; with continuous noise ties do not occur, and `libs.sampling.decoding.generate` with its `maskgit` schedule
draws the same noise in the same order and gives the same ids (tests/test_maskgit.py).
"""
import math
from typing import Callable, List, Optional, Sequence

import torch

from libs.nonfinite import all_finite, autocast_precision, raise_if_nonfinite
from libs.sampling.decoding import guidance_classes, guided_logits, gumbel, initial_ids

DEFAULT_STEPS = 16  # the release's inference default (generate_samples); parallel_decode's own default is 12
CHOICE_TEMPERATURE = 4.5  # the release's sample_choice_temperature
MIN_MASK_RATIO = 1e-6  # the schedule is clipped to [1e-6, 1]


def progress(step: int, steps: int) -> torch.Tensor:
    """r = (step+1)/steps as a float32 0-d tensor (one correctly rounded float32 division)."""
    return torch.tensor(step + 1, dtype=torch.float32) / torch.tensor(steps, dtype=torch.float32)


def cosine_mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """clip(cos(pi/2 * r), 1e-6, 1) in float32 (pi/2 rounded to float32, the product and cosine in float32)."""
    return torch.cos(torch.tensor(math.pi / 2, dtype=torch.float32) * r).clamp(MIN_MASK_RATIO, 1.0)


def mask_lengths(n_unknown: torch.Tensor, n_masked: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """[B] long: max(1, min(n_masked - 1, floor(n_unknown * ratio))), the product in float32.

    n_unknown: [MASK] count per sample before the first step; n_masked: before this step; ratio: 0-d float32.
    """
    scaled = torch.floor(n_unknown.to(torch.float32) * ratio)  # [B]
    return torch.clamp(torch.minimum(n_masked.to(torch.float32) - 1, scaled), min=1).long()


def remask(conf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B,L] bool: places whose confidence is strictly below the lengths[i]-th smallest of row i (0-based)."""
    cut = conf.sort(dim=-1).values.gather(1, lengths.clamp(max=conf.shape[1] - 1)[:, None])  # [B,1]
    return conf < cut


def torch_noise(generator, device) -> Callable:
    """noise(kind, step, shape) -> standard Gumbel noise from `generator` (one, or a list with one per sample)."""
    return lambda kind, step, shape: gumbel(shape, generator, device)


def prepare_classes(model, class_ids, guided: bool, null_class_id):
    """Lets a model with per-class terms (FusionCache: `prepare_classes`) compute them before the first step, for
    the class tensor that step passes ([cond; uncond] when `guided`), so that no step reads the device. A
    schedule that switches between guided and plain steps passes another tensor at each switch (one read there).
    """
    prepare = getattr(model, "prepare_classes", None)
    if prepare is not None:
        prepare(guidance_classes(class_ids, null_class_id) if guided else class_ids)


@torch.no_grad()
def decode(model: Callable, class_ids: torch.Tensor, *, seq_len: int, mask_token_id: int,
           steps: int = DEFAULT_STEPS, choice_temperature: float = CHOICE_TEMPERATURE,
           sample_temperature: float = 1.0, start_iter: int = 0, init_ids: Optional[torch.Tensor] = None,
           known: Optional[torch.Tensor] = None, guidance: Optional[Sequence[float]] = None,
           null_class_id: Optional[int] = None, generator=None, noise: Optional[Callable] = None,
           record: Optional[List] = None) -> torch.Tensor:
    """MaskGIT parallel decoding; returns ids [B,L] in [0, K).

    model(ids [B,L], class_ids [B]) -> logits [B,L,K]. Starts from all-[MASK] or from `init_ids` (`known` places,
    default the non-[MASK] ones, are kept: editing; the release edits with start_iter 2 of 12). `guidance`: a
    scale per step (T entries; 0 = one plain forward) with the unconditional pass on `null_class_id`.
    `noise(kind, step, shape)` supplies the Gumbel draws ('sample' [B,L,K], then 'choice' [B,L] per step;
    default: `torch_noise(generator, device)`). `record` receives the sampled ids [B,L] of every step (before
    re-masking, as the release's per-step output). Raises ValueError for a start_iter outside [0, steps), and
    libs.nonfinite.NonFiniteLogits naming the first step (of `steps`, counted from 1) whose logits hold NaN/inf
    and the autocast precision: each step records a flag on the device, read once after the loop.
    """
    if not 0 <= start_iter < steps:
        raise ValueError(f"start_iter must lie in [0, {steps}), got {start_iter}")
    if guidance is not None and len(guidance) != steps:
        raise ValueError(f"guidance needs one scale per step ({steps}), got {len(guidance)}")
    class_ids = class_ids.view(-1).long()
    device = class_ids.device
    noise = noise or torch_noise(generator, device)
    ids = initial_ids(class_ids.shape[0], seq_len, mask_token_id, device, init_ids, known)
    n_unknown = (ids == mask_token_id).sum(1)  # [B]
    prepare_classes(model, class_ids, guidance is not None and bool(guidance[start_iter]), null_class_id)
    # per step a 0-d bool on the device, no host sync inside the loop; the steps skipped by start_iter count as
    # finite so that a flag's index is its step
    finite = [torch.ones((), dtype=torch.bool, device=device)] * start_iter
    for step in range(start_iter, steps):
        scale = guidance[step] if guidance is not None else 0.0
        if scale:
            logits = guided_logits(model, ids, class_ids, scale, null_class_id)
        else:
            logits = model(ids, class_ids).float()  # [B,L,K]
        finite.append(all_finite(logits))
        unknown = ids == mask_token_id
        g = noise("sample", step, logits.shape)
        scores = logits / sample_temperature + g if sample_temperature > 0 else logits
        sampled = torch.where(unknown, scores.argmax(-1), ids)  # [B,L]
        if record is not None:
            record.append(sampled.clone())
        if step == steps - 1:
            ids = sampled
            break
        r = progress(step, steps)
        lengths = mask_lengths(n_unknown, unknown.sum(1), cosine_mask_ratio(r))  # [B]
        probs = torch.softmax(logits, dim=-1).gather(-1, sampled[..., None])[..., 0]  # [B,L]
        probs = torch.where(unknown, probs, torch.full_like(probs, math.inf))
        temperature = torch.tensor(choice_temperature, dtype=torch.float32) * (1 - r)
        conf = torch.log(probs) + temperature * noise("choice", step, probs.shape)
        ids = torch.where(remask(conf, lengths), torch.full_like(sampled, mask_token_id), sampled)
    raise_if_nonfinite(finite, autocast_precision(device.type))  # the one read of the flags
    return ids
