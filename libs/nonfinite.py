"""Non-finite logits while sampling or scoring: the precision in use, what to try, and the error that stops a run.

The checks cost no host synchronisation per step: a step records `all_finite(logits)`, a 0-d bool that stays on
the device, and the flags are read once after the loop (`raise_if_nonfinite`).
"""
import torch

from libs.errors import NonFiniteValues

AUTOCAST_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class NonFiniteLogits(NonFiniteValues):
    """A token model gave NaN/inf logits; `step` (0-based) and `precision` say where and under which autocast."""

    def __init__(self, message: str, step: int = None, precision: str = "fp32"):
        super().__init__(message)
        self.step, self.precision = step, precision


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool on x's device: True when x holds no NaN/inf (no host sync). One min/max pass: NaN propagates to
    both, +inf shows in the max, -inf in the min; exact like torch.isfinite(x).all(), and 20-50x cheaper on a
    CPU for logits of [125,256,1025]."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


def autocast_precision(device_type: str) -> str:
    """'fp16' / 'bf16' when autocast of that dtype is on for `device_type` ('cpu', 'cuda'), else 'fp32'."""
    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    dtype = torch.get_autocast_dtype(device_type)
    return AUTOCAST_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def what_to_try(precision: str) -> str:
    """Advice for NaN/inf logits under `precision` ('fp32', 'bf16', 'fp16')."""
    if precision == "fp16":
        return ("try --precision fp32 or bf16 (float16 overflows above 65504; bf16 has float32's range)")
    if precision == "bf16":
        return "try --precision fp32"
    return ("the weights give NaN/inf logits in float32: check the checkpoint (a diverged or damaged training run "
            "gives such weights)")


def first_false(flags) -> int:
    """Index of the first False among 0-d bool tensors `flags` (one host sync for all of them); -1 if none."""
    if not len(flags):
        return -1
    ok = torch.stack(list(flags)).cpu()  # [n] bool: the one copy to the host
    bad = (~ok).nonzero()
    return int(bad[0, 0]) if len(bad) else -1


def raise_if_nonfinite(step_ok, precision: str, what: str = "sampling"):
    """NonFiniteLogits naming the first step whose flag in `step_ok` (0-d bool tensors, True = finite logits)
    is False, the precision and what to try; nothing when every step was finite."""
    t = first_false(step_ok)
    if t < 0:
        return
    raise NonFiniteLogits(f"{what} stopped: the token model's logits turned NaN/inf at decoding step {t + 1} of "
                          f"{len(step_ok)} under precision {precision}; no image of this batch was decoded or "
                          f"written; {what_to_try(precision)}", step=t, precision=precision)
