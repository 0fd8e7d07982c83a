"""Parallel decoding of masked-token models: schedules, guidance schedules and iterative re-masking
(docs/reference.md#decoding).

`generate` decodes from all-[MASK], or from given ids where only the unknown tokens are decoded (editing:
inpainting, outpainting; libs/sampling/editing.py). Both are one code path: ordinary generation is the case
where every token is unknown.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from libs.nonfinite import all_finite, autocast_precision, raise_if_nonfinite

RATIO_DTYPES = {"float32": torch.float32, "float64": torch.float64}
GUIDANCE_SCHEDULES = ("constant", "linear", "pow-cosine")  # maskgit schedule: how the guidance grows over steps
ORDERS = ("confidence", "halton")  # which masked tokens stay masked after a step


@dataclass
class Schedule:
    """Per-step decoding parameters; ratio and conf_temp have T-1 entries (the last step has 0).

    `ratio_dtype` ("float32" or "float64", a string so that the schedule stays JSON-serialisable) is the
    precision of the re-mask count floor(n_unknown * ratio): float32 for the MaskGIT cosine schedule (whose
    ratios are float32 values, as in the reference arithmetic), float64 otherwise.
    `order`: "confidence" re-masks the least confident sampled tokens (with conf_temps noise); "halton" keeps
    the tokens that come first in a fixed Halton order over the token grid (conf_temps unused).
    """
    ratios: List[float]
    conf_temps: List[float]
    sample_temps: List[float]
    guidance: List[float]
    ratio_dtype: str = "float64"
    order: str = "confidence"

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
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


# ----------------------------------------------------------------------------- guidance per step


def guidance_values(kind: str, scale: float, steps: int, power: float = 1.0) -> List[float]:
    """The guidance s_t of steps t = 0..T-1 (docs/reference.md#guidance-schedules).

    constant:   s_t = scale
    linear:     s_t = torch.linspace(0, scale, T)[t]  (= scale * t/(T-1); [0] when T = 1), MaskGIT's ramp
    pow-cosine: s_t = scale * (1 - cos(pi * (t/(T-1))**power)) / 2  ([0] when T = 1): 0 at the first step,
                scale at the last; power > 1 keeps it low for longer, power < 1 raises it sooner.
    """
    if kind == "constant":
        return [float(scale)] * steps
    if kind == "linear":
        return torch.linspace(0, scale, steps, dtype=torch.float64).tolist()
    if kind == "pow-cosine":
        if not power > 0:
            raise ValueError(f"guidance_power must be positive, got {power}")
        if steps == 1:
            return [0.0]
        return [scale * (1 - math.cos(math.pi * (t / (steps - 1)) ** power)) / 2 for t in range(steps)]
    raise ValueError(f"unknown guidance_schedule '{kind}' (one of {', '.join(GUIDANCE_SCHEDULES)})")


def parse_guidance_steps(value, steps: int) -> Optional[List[int]]:
    """The step indices where guidance applies: None for 'all', else sorted indices in [0, T).

    `value`: 'all', a list of ints, or a string of comma-separated indices and inclusive ranges ('3,4,5',
    '3-7', '[3, 4]'). Raises ValueError for anything else, a range a-b with a > b or an index outside [0, T).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()").replace(" ", "")
        if not text:
            raise ValueError(f"guidance_steps '{value}' lists no step (use 'all', '3,4,5' or '3-7')")
        out = []
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            try:
                first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
            except ValueError:
                raise ValueError(f"guidance_steps '{value}': '{part}' is not a step index or range a-b") from None
            if first > last:  # an empty range would switch guidance off without a word
                raise ValueError(f"guidance_steps '{value}': the range '{part}' runs backwards (write a-b with a <= b)")
            if first < 0 or last >= steps:  # checked before the range is expanded
                raise ValueError(f"guidance_steps '{part}' outside the {steps} steps 0..{steps - 1}")
            out.extend(range(first, last + 1))
    else:
        out = [int(s) for s in value]
    bad = [s for s in out if not 0 <= s < steps]
    if bad:
        raise ValueError(f"guidance_steps {bad} outside the {steps} steps 0..{steps - 1}")
    return sorted(set(out))


def restrict_guidance(guidance: List[float], keep: Optional[List[int]]) -> List[float]:
    """guidance with 0 at the steps not in `keep` (None keeps every step)."""
    if keep is None:
        return list(guidance)
    return [float(g) if t in keep else 0.0 for t, g in enumerate(guidance)]


# ----------------------------------------------------------------------------- schedules


def maskgit_schedule(steps: int, guidance_scale: float, temp: float = 4.5, guidance_schedule: str = "linear",
                     guidance_power: float = 1.0) -> Schedule:
    """MaskGIT cosine schedule: ratio cos(pi/2 (t+1)/T), conf temp temp*(1-(t+1)/T), guidance 0 -> scale.

    The ratios are computed in float32 like the reference: (t+1)/T rounded to float32, times pi/2 and
    the cosine in float32; the re-mask count floor(n_unknown * ratio) is then also taken in float32
    (`ratio_dtype`). This matters: at (t+1)/T = 2/3 the float32 cosine is 0.49999997, so 256 tokens
    give 127 re-masked where float64 gives 128. The guidance follows `guidance_schedule`
    (`guidance_values`; the default 'linear' is torch.linspace(0, scale, T), so T = 1 has guidance [0]).
    """
    t = torch.arange(steps, dtype=torch.float64)
    progress = ((t + 1) / steps).to(torch.float32)  # [T] (t+1)/T rounded to float32
    ratios = torch.cos(math.pi / 2 * progress)[:-1].tolist()  # float32 arithmetic
    conf = (temp * (1 - (t + 1) / steps))[:-1].tolist()
    guid = guidance_values(guidance_schedule, guidance_scale, steps, guidance_power)
    return Schedule(ratios, conf, [1.0] * steps, guid, ratio_dtype="float32")


def schedule_from_config(cfg) -> Schedule:
    """Builds a Schedule from a config `sample` block (`schedule: autonat|maskgit`).

    Optional keys (absent = default): `guidance_schedule` ('linear') and `guidance_power` (1.0), used by the
    maskgit schedule only (the autonat strategy keeps its per-step guidance list); `guidance_steps` ('all'),
    the steps where guidance applies (0 elsewhere), for both; `order` ('confidence' or 'halton').
    """
    if cfg.schedule == "autonat":
        schedule = Schedule(list(cfg.ratios), list(cfg.conf_temps), list(cfg.sample_temps), list(cfg.guidance))
    elif cfg.schedule == "maskgit":
        schedule = maskgit_schedule(cfg.steps, cfg.cfg_scale, cfg.temp, cfg.get("guidance_schedule", "linear"),
                                    cfg.get("guidance_power", 1.0))
    else:
        raise ValueError(f"unknown schedule '{cfg.schedule}' (autonat or maskgit)")
    keep = parse_guidance_steps(cfg.get("guidance_steps", "all"), schedule.steps)
    return dataclasses.replace(schedule, guidance=restrict_guidance(schedule.guidance, keep),
                               order=cfg.get("order", "confidence"))


# ----------------------------------------------------------------------------- noise and counts


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


def scaled_counts(n, ratio: float, dtype: str = "float64") -> torch.Tensor:
    """floor(n * ratio) per entry of the int tensor `n`, both factors and the product in `dtype`."""
    dt = RATIO_DTYPES[dtype]
    # torch.full fills on the device; torch.tensor(ratio, device=...) would copy from the host (a GPU sync)
    return torch.floor(n.to(dt) * torch.full((), ratio, dtype=dt, device=n.device)).long()


def remask_count(seq_len: int, ratio: float, dtype: str = "float64") -> int:
    """floor(seq_len * ratio) with both factors and the product in `dtype` (float32: the reference's count)."""
    return int(scaled_counts(torch.tensor([seq_len]), ratio, dtype)[0])


def remask_counts(n_unknown, n_masked, ratio: float, dtype: str = "float64") -> torch.Tensor:
    """Tokens re-masked after a (non-final) step, per sample [B]: max(1, min(n_masked - 1, floor(n_unknown *
    ratio))), and 0 for a sample with nothing unknown. n_unknown counts the tokens that were [MASK] before the
    first step (all L for ordinary generation), n_masked those still [MASK] before this step."""
    counts = torch.maximum(torch.minimum(n_masked - 1, scaled_counts(n_unknown, ratio, dtype)),
                           torch.ones_like(n_masked))
    return torch.where(n_unknown > 0, counts, torch.zeros_like(counts))


def host_remask_counts(n_unknown: np.ndarray, n_masked: np.ndarray, ratio: float,
                       dtype: str = "float64") -> np.ndarray:
    """remask_counts on the host: int arrays [B] in, int64 [B] out, with the same float arithmetic (one IEEE
    product in `dtype`, then floor), so it equals the device counts without reading them back."""
    dt = np.dtype(dtype).type
    scaled = np.floor(np.asarray(n_unknown).astype(dt) * dt(ratio)).astype(np.int64)
    counts = np.maximum(np.minimum(np.asarray(n_masked) - 1, scaled), 1)
    return np.where(np.asarray(n_unknown) > 0, counts, 0).astype(np.int64)


def remask_lowest(sampled, score, counts, mask_token_id: int, n_max: Optional[int] = None):
    """sampled [B,L] with the counts[i] lowest-`score` places of row i set to [MASK] (counts may differ by row).

    Equal counts reduce to one topk(n) per row, the arithmetic of decoding from all-[MASK]. `n_max` is
    max(counts) when the caller knows it on the host (then counts are never read back: no GPU sync); without
    it the maximum is read from `counts`.
    """
    if n_max is None:
        n_max = int(counts.max()) if counts.numel() else 0
    lowest = score.topk(n_max, dim=-1, largest=False).indices  # [B,n_max], lowest first
    keep = torch.arange(n_max, device=score.device)[None] < counts[:, None]  # [B,n_max]
    remask = torch.zeros_like(sampled, dtype=torch.bool).scatter(1, lowest, keep)
    return sampled.masked_fill(remask, mask_token_id)


# ----------------------------------------------------------------------------- Halton order


def radical_inverse(i: int, base: int) -> float:
    """The base-`base` van der Corput value of i: its digits mirrored after the radix point."""
    value, scale = 0.0, 1.0 / base
    while i:
        i, digit = divmod(i, base)
        value += digit * scale
        scale /= base
    return value


@functools.lru_cache(maxsize=16)
def halton_order(height: int, width: int) -> tuple:
    """Every position (row-major index) of a height x width grid once, in the order the 2-D Halton sequence
    (base 2 for the column, base 3 for the row, from index 1) first visits its cell: a fixed, spread-out
    order in which neighbours of early tokens come late."""
    order, seen, i = [], set(), 1
    while len(order) < height * width:
        col = int(radical_inverse(i, 2) * width)
        row = int(radical_inverse(i, 3) * height)
        pos = row * width + col
        if pos not in seen:
            seen.add(pos)
            order.append(pos)
        i += 1
    return tuple(order)


def halton_priority(seq_len: int, device) -> torch.Tensor:
    """[L] float: minus each position's rank in the Halton order of the square token grid (earlier = higher)."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"the halton order needs a square token grid, got {seq_len} tokens")
    rank = torch.empty(seq_len, dtype=torch.float32)
    rank[torch.tensor(halton_order(side, side))] = torch.arange(seq_len, dtype=torch.float32)
    return (-rank).to(device)


# ----------------------------------------------------------------------------- decoding


_LAST_GUIDANCE_CLASSES = [None]  # (class_ids, its version, null id, [2B] ids) of the last guidance_classes call


def guidance_classes(class_ids, null_class_id: int):
    """Class ids [2B] of the batched [cond; uncond] forward: class_ids [B], then B null classes.

    The same tensor object comes back while the same, unchanged `class_ids` object is passed (the steps of
    one decoding run), so a model can keep per-class terms across steps without reading the ids back.
    """
    if class_ids.is_inference():  # inference tensors keep no version counter: nothing to remember them by
        return torch.cat([class_ids, torch.full_like(class_ids, null_class_id)])
    last = _LAST_GUIDANCE_CLASSES[0]
    if last is not None and last[0] is class_ids and last[1] == class_ids._version and last[2] == null_class_id:
        return last[3]
    both = torch.cat([class_ids, torch.full_like(class_ids, null_class_id)])
    _LAST_GUIDANCE_CLASSES[0] = (class_ids, class_ids._version, null_class_id, both)
    return both


def guided_logits(model: Callable, ids, class_ids, scale: float, null_class_id: int):
    """cond + scale * (cond - uncond), with [cond; uncond] in one batched forward."""
    B = ids.shape[0]
    both_ids = torch.cat([ids, ids])
    both_cls = guidance_classes(class_ids, null_class_id)  # [2B]
    logits = model(both_ids, both_cls).float()
    cond, uncond = logits[:B], logits[B:]
    return cond + scale * (cond - uncond)


def initial_ids(batch: int, seq_len: int, mask_token_id: int, device, init_ids=None, known=None) -> torch.Tensor:
    """Ids [B,L] decoding starts from: all [MASK], or `init_ids` with [MASK] wherever `known` is False.

    `known` [B,L] bool defaults to `init_ids != mask_token_id`. Known ids must lie in [0, mask_token_id).
    """
    if init_ids is None:
        if known is not None:
            raise ValueError("`known` needs `init_ids`")
        return torch.full((batch, seq_len), mask_token_id, dtype=torch.long, device=device)
    init_ids = init_ids.to(device=device, dtype=torch.long)
    if init_ids.shape != (batch, seq_len):
        raise ValueError(f"init_ids must be [{batch},{seq_len}], got {tuple(init_ids.shape)}")
    known = init_ids != mask_token_id if known is None else known.to(device=device, dtype=torch.bool)
    if known.shape != init_ids.shape:
        raise ValueError(f"known must be [{batch},{seq_len}] like init_ids, got {tuple(known.shape)}")
    given = init_ids[known]
    if given.numel() and (int(given.min()) < 0 or int(given.max()) >= mask_token_id):
        raise ValueError(f"known token ids must lie in [0,{mask_token_id}); got [{int(given.min())},"
                         f"{int(given.max())}]")
    return torch.where(known, init_ids, torch.full_like(init_ids, mask_token_id))


@torch.no_grad()
def generate(model: Callable, class_ids: torch.Tensor, schedule: Schedule, *, seq_len: int,
             mask_token_id: int, null_class_id: int, generator: Optional[torch.Generator] = None,
             record: Optional[list] = None, init_ids: Optional[torch.Tensor] = None,
             known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Parallel decoding; returns ids [B,L] in [0, K). `record` gets ids after each step.

    Starts from all-[MASK], or from `init_ids` [B,L] whose `known` [B,L] places (default: the non-[MASK] ones)
    are kept as they are and only the others are decoded (inpainting / outpainting). The schedule counts
    each sample's unknown tokens: after step t, max(1, min(#masked - 1, floor(n_unknown * ratio_t))) places
    stay [MASK] (the rule of decoding from all-[MASK], where n_unknown = L). A sample with nothing unknown
    comes back unchanged. Every token unknown is ordinary generation, bit for bit.

    `generator`: one torch.Generator for the batch, or a list of one per sample (per-index seeding:
    a sample's noise then does not depend on which other samples share its batch).

    Raises libs.nonfinite.NonFiniteLogits (naming the first such step and the autocast precision) when the
    logits of any step hold NaN/inf; each step only records a flag on the device, read once after the loop.
    """
    class_ids = class_ids.view(-1).long()
    B, device = class_ids.shape[0], class_ids.device
    ids = initial_ids(B, seq_len, mask_token_id, device, init_ids, known)
    n_unknown = (ids == mask_token_id).sum(1)  # [B]
    priority = halton_priority(seq_len, device) if schedule.order == "halton" else None  # [L]
    # Host reads happen here, before the steps, never inside them: the unknown counts (when editing; all L
    # otherwise), mirrored on the host so that each step's re-mask sizes are known without reading the device,
    # and a model's per-class terms (FusionCache), computed for the run's class ids once.
    host_masked = host_unknown = np.full(B, seq_len) if init_ids is None else n_unknown.cpu().numpy()
    prepare = getattr(model, "prepare_classes", None)
    if prepare is not None:
        prepare(guidance_classes(class_ids, null_class_id))
    T = schedule.steps
    finite = []  # per step a 0-d bool on the device: no host sync inside the loop
    for t in range(T):
        logits = guided_logits(model, ids, class_ids, schedule.guidance[t], null_class_id)  # [B,L,K]
        finite.append(all_finite(logits))
        is_masked = ids == mask_token_id
        temp = max(schedule.sample_temps[t], 1e-4)
        sampled = (logits / temp + gumbel(logits.shape, generator, device)).argmax(-1)  # Categorical
        sampled = torch.where(is_masked, sampled, ids)
        if t == T - 1:
            ids = sampled
        else:
            if priority is None:  # confidence of the sampled token, with Gumbel noise of temperature kappa_t
                conf = torch.log_softmax(logits, dim=-1).gather(-1, sampled[..., None])[..., 0]  # [B,L]
                conf = torch.where(is_masked, conf, torch.full_like(conf, math.inf))
                conf = conf + schedule.conf_temps[t] * gumbel(conf.shape, generator, device)
            else:  # a fixed order: the places latest in it stay masked
                conf = torch.where(is_masked, priority.expand(B, -1), torch.full_like(priority, math.inf))
            counts = remask_counts(n_unknown, is_masked.sum(1), schedule.ratios[t], schedule.ratio_dtype)
            host_masked = host_remask_counts(host_unknown, host_masked, schedule.ratios[t], schedule.ratio_dtype)
            ids = remask_lowest(sampled, conf, counts, mask_token_id, n_max=int(host_masked.max(initial=0)))
        if record is not None:
            record.append(ids.clone())
    raise_if_nonfinite(finite, autocast_precision(device.type))  # the one read of the flags
    return ids
