"""Optional CPU inference kernels: the backbone's linear layers through oneDNN, GELU fused where it follows.

Switched on per model, never process-wide: `use_onednn_linears(model)` swaps the `nn.Linear` layers of the
backbone's blocks and head (AutoNAT's, MaskGIT's; KA-MIG's and KA-MaskGIT's backbones alike, their GCNs and graph
modules keep `nn.Linear`) for `OneDNNLinear` (same parameters, same state_dict) and is called by the model factory
when the sampling scripts get `--cpu-kernels onednn` (their default). A swapped layer takes the oneDNN path only for
fp32 CPU inference (no grad, no autocast); training, autocast and GPU runs go through `F.linear` as before. Logits
match the plain model within 1e-5 (tests/test_autonat.py, tests/test_cpu_kernels_maskgit.py); the speed-up is
measured by benchmarks/sampling.py and benchmarks/maskgit_vs_jax.py
(docs/reference.md#deliberate-differences-from-the-papers-code).
"""
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from libs.models import autonat, maskgit  # neither imports this module: no cycle

AUTONAT_LAYERS = (autonat.Attention, autonat.Mlp, autonat.Block, autonat.MlmLayer)
MASKGIT_LAYERS = (maskgit.Attention, maskgit.Mlp, maskgit.MlmLayer)
BACKBONE_LAYERS = AUTONAT_LAYERS + MASKGIT_LAYERS  # modules whose nn.Linear children are swapped

CPU_KERNELS = ("onednn", "default")  # values of the sampling scripts' --cpu-kernels flag
FUSION_TOLERANCE = 1e-5  # max |fused - F.gelu(F.linear(...))| for the tanh GELU to be fused

# torch's fused oneDNN linear (+ optional post-op); None when this torch build has no oneDNN.
ONEDNN_LINEAR = (getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
                 if torch.backends.mkldnn.is_available() else None)


def onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for fp32 CPU inference (no grad, no autocast) when torch has oneDNN's fused linear."""
    return (ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


class OneDNNLinear(nn.Linear):
    """nn.Linear (+ GELU when `gelu`, `approximate` 'none' or 'tanh' as F.gelu) computed by one oneDNN call for
    fp32 CPU inference."""

    def __init__(self, linear: nn.Linear, gelu: bool = False, approximate: str = "none"):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.gelu, self.approximate = gelu, approximate

    def forward(self, x):
        if onednn_eligible(x, self.weight):
            return ONEDNN_LINEAR(x, self.weight, self.bias, "gelu" if self.gelu else "none", [],
                                 self.approximate if self.gelu else "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate=self.approximate) if self.gelu else y


# module class -> the linear its `act` GELU follows (both backbones' MLPs and heads)
GELU_AFTER = {autonat.Mlp: "fc1", autonat.MlmLayer: "fc", maskgit.Mlp: "intermediate_output",
              maskgit.MlmLayer: "mlm_dense"}


@lru_cache(maxsize=None)
def tanh_gelu_fusable() -> bool:
    """True when oneDNN's fused linear takes the tanh GELU and matches F.gelu(F.linear(...), approximate='tanh')
    within FUSION_TOLERANCE on a seeded fp32 probe [2,9,32] -> [2,9,48]."""
    if ONEDNN_LINEAR is None:
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 9, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    with torch.no_grad():
        try:
            got = ONEDNN_LINEAR(x, w, b, "gelu", [], "tanh")
        except RuntimeError:  # a oneDNN without the tanh algorithm
            return False
        want = F.gelu(F.linear(x, w, b), approximate="tanh")
    return got.shape == want.shape and bool((got - want).abs().max() <= FUSION_TOLERANCE)


def fuse_gelus(model: nn.Module):
    """Folds the GELU after the first linear of every MLP and head into a fused OneDNNLinear: AutoNAT's exact
    GELU always, MaskGIT's tanh GELU when tanh_gelu_fusable()."""
    tanh = tanh_gelu_fusable()
    for module in model.modules():
        first = next((name for cls, name in GELU_AFTER.items() if isinstance(module, cls)), None)
        act = getattr(module, "act", None)
        if first is None or not isinstance(act, nn.GELU) or (act.approximate == "tanh" and not tanh):
            continue  # not an MLP or head, already fused, or a tanh GELU this oneDNN cannot fuse
        setattr(module, first, OneDNNLinear(getattr(module, first), gelu=True, approximate=act.approximate))
        module.act = nn.Identity()  # linear + GELU in one call


def onednn_layer_count(model: nn.Module) -> int:
    """Number of OneDNNLinear layers in `model` (0 for a plain model)."""
    return sum(isinstance(m, OneDNNLinear) for m in model.modules())


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Swaps the nn.Linear layers of the backbone's blocks and head (AutoNAT's or MaskGIT's) for OneDNNLinear in
    place, fusing the GELU of the MLPs and of the head (the GCNs and graph modules of KA-MIG / KA-MaskGIT keep
    theirs). Module names and state_dict keys are unchanged; onednn_layer_count(model) gives the swapped layers.

    Returns `model`. Raises RuntimeError when this torch build has no oneDNN (use --cpu-kernels default),
    ValueError when `model` has none of those layers (nothing would change).
    """
    if ONEDNN_LINEAR is None:
        raise RuntimeError("this torch build has no oneDNN fused linear; use --cpu-kernels default")
    fuse_gelus(model)
    for module in [m for m in model.modules() if isinstance(m, BACKBONE_LAYERS)]:
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, OneDNNLinear(child))
    if onednn_layer_count(model) == 0:
        raise ValueError(f"cpu kernels 'onednn': {type(model).__name__} has no AutoNAT or MaskGIT block or head "
                         f"whose linears oneDNN could run; use --cpu-kernels default")
    return model


def apply_cpu_kernels(model: nn.Module, kind: str) -> nn.Module:
    """`kind` 'onednn' -> use_onednn_linears(model); 'default' -> model unchanged. ValueError otherwise."""
    if kind == "onednn":
        return use_onednn_linears(model)
    if kind == "default":
        return model
    raise ValueError(f"unknown cpu kernels '{kind}' (one of {', '.join(CPU_KERNELS)})")
