"""Optional CPU inference kernels: the backbone's linear layers through oneDNN, GELU fused where it follows.

Switched on per model, never process-wide: `use_onednn_linears(model)` swaps the `nn.Linear` layers of the
backbone's blocks and head for `OneDNNLinear` (same parameters, same state_dict) and is called by the model factory when the sampling
scripts get `--cpu-kernels onednn` (their default). A swapped layer takes the oneDNN path only for fp32 CPU
inference (no grad, no autocast); training, autocast and GPU runs go through `F.linear` as before. Logits
match the plain model within 1e-5 (tests/test_autonat.py); the speed-up is measured by benchmarks/sampling.py
(docs/reference.md#deliberate-differences-from-the-papers-code).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from libs.models.autonat import Attention, Block, MlmLayer, Mlp

BACKBONE_LAYERS = (Attention, Mlp, Block, MlmLayer)  # modules whose nn.Linear children are swapped

CPU_KERNELS = ("onednn", "default")  # values of the sampling scripts' --cpu-kernels flag

# torch's fused oneDNN linear (+ optional post-op); None when this torch build has no oneDNN.
ONEDNN_LINEAR = (getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)


def onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for fp32 CPU inference (no grad, no autocast) when torch has oneDNN's fused linear."""
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


class OneDNNLinear(nn.Linear):
    """nn.Linear (+ exact GELU when `gelu`) computed by one oneDNN call for fp32 CPU inference."""

    def __init__(self, linear: nn.Linear, gelu: bool = False):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.gelu = gelu

    def forward(self, x):
        if onednn_eligible(x, self.weight):
            return ONEDNN_LINEAR(x, self.weight, self.bias, "gelu" if self.gelu else "none", [],
                                 "none" if self.gelu else "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Swaps the nn.Linear layers of the backbone's blocks and head for OneDNNLinear in place, fusing the GELU
    of the MLPs and of the head (the GCNs of KA-MIG keep theirs).

    Returns `model`. Raises RuntimeError when this torch build has no oneDNN (use --cpu-kernels default).
    """
    if ONEDNN_LINEAR is None:
        raise RuntimeError("this torch build has no oneDNN fused linear; use --cpu-kernels default")
    for module in model.modules():
        if isinstance(module, (Mlp, MlmLayer)) and isinstance(module.act, nn.GELU):
            first = "fc1" if isinstance(module, Mlp) else "fc"
            setattr(module, first, OneDNNLinear(getattr(module, first), gelu=True))  # fc -> GELU in one call
            module.act = nn.Identity()
    for module in [m for m in model.modules() if isinstance(m, BACKBONE_LAYERS)]:
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, OneDNNLinear(child))
    return model


def apply_cpu_kernels(model: nn.Module, kind: str) -> nn.Module:
    """`kind` 'onednn' -> use_onednn_linears(model); 'default' -> model unchanged. ValueError otherwise."""
    if kind == "onednn":
        return use_onednn_linears(model)
    if kind == "default":
        return model
    raise ValueError(f"unknown cpu kernels '{kind}' (one of {', '.join(CPU_KERNELS)})")
