"""Peak GPU memory of ka-mig's workloads at the paper's sizes, estimated on a CPU with fake tensors.

    python -m benchmarks.memory                    # the table: peak at the paper's batch, largest batch per GPU size
    python -m benchmarks.memory --check-rss        # also the estimator against a real CPU run's peak RSS
    python -m benchmarks.memory --json out.json    # also the figures as JSON

Workloads, per GPU: KA-MIG training at 300 images in fp16 (configs/ka_mig_l.py, the paper's run: frozen AutoNAT-L,
AdamW on the graph modules and the head, EMA of those), AutoNAT-L pretraining at 256 in fp16 (configs/autonat_l.py),
sampling KA-MIG at batch 125 with guidance (the T=8 AutoNAT strategy, then the tokenizer's decode) in fp32 (the
scripts' default) and bf16, and the tokenizer's encode at extract_imagenet_feature.py's default batch (64 images and
their flips); on the MaskGIT host, KA-MaskGIT training at 300 (configs/ka_maskgit.py), MaskGIT pretraining at 256
(configs/maskgit.py, the release's objective) and sampling KA-MaskGIT at 125 (T=16 cosine schedule). Weights are
random: memory depends on shapes only.

Method. The library code of each workload (factory models, FusionCache, generate, tokenizer, masked_token_loss,
torch.optim.AdamW, GradScaler) runs on fake CPU tensors (torch._subclasses.fake_tensor.FakeTensorMode: shapes,
dtypes and strides, no memory and no arithmetic), under `PeakMemory`, a dispatch mode that counts the bytes of every
tensor storage alive after each operator, rounded up to 512 bytes as the CUDA caching allocator rounds its blocks,
and keeps the peak: the figure `torch.cuda.max_memory_allocated()` reports. Fake *CPU* tensors, because on a
machine without a GPU fake CUDA tensors cannot run a backward pass (the autograd engine asks for a CUDA context),
autocast on "cuda" switches itself off, and scaled_dot_product_attention falls back to the math kernel (which
stores the [B,h,n,n] attention) where a GPU runs flash attention. What CPU tensors change is emulated: CPU
autocast casts most operators of these models as CUDA autocast does (linear, matmul, conv and attention to
fp16/bf16, softmax and the loss in fp32; layer norm, group norm and interpolation, which CPU autocast leaves in
their input's dtype, are run in fp32 as CUDA autocast does (`CudaAutocastFp32`); tests/test_benchmark_tools.py
compares the two operator by operator on a fake forward), CPU attention is the flash kernel (output and
log-sum-exp saved, as on a GPU; attention with dropout, which a CPU runs with the math kernel, is run without it:
`CudaAttentionDropout`), and AdamW is told to take its foreach path as it does on CUDA.
torch.distributed._tools.mem_tracker.MemTracker (torchtitan's estimator) does not run these workloads in torch 2.14:
it hooks the gradient of every parameter, which raises on the frozen backbone, and refuses a module called twice
(every decoding step); tests/test_benchmark_tools.py checks PeakMemory against it on a pretraining step, where both
run.

Values: fake tensors have none, but a few host reads decide shapes. The inputs (token ids, masks, class ids) carry
their real values (`shadows`), which follow them through small operators, so unique() of the class ids, boolean
masks of the loss and equal() of the sampler's class cache get their real sizes. Reads of values computed by the
network (finiteness flags, the decoder's re-mask counts, token range checks) are answered as if all was well
(True, 0, no non-zero entry) and counted in `guessed`: they steer checks and index tensors of a few kilobytes.

Known error of the estimate against a GPU's real use: the CUDA context (about 0.5-1 GB, outside the allocator and
outside max_memory_allocated), cuBLAS / cuDNN workspaces (tens of MB to a few hundred), the allocator's caching and
fragmentation (max_memory_reserved exceeds max_memory_allocated, typically by 5-15%), blocks up to 1 MB larger
than asked for when a cached block is not split, and the fused CUDA dropout keeping a bool mask where CPU dropout
keeps a float one (counted here, so 3 bytes per element too many: at most 0.18 GB for the token dropout of AutoNAT
pretraining at batch 256). A batch counts as fitting a GPU when the estimate leaves CONTEXT (1 GiB) free and then
FRAGMENTATION (10%) of the rest (`usable`).
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from libs.atomic_io import atomic_write_json
from libs.config import load_config_file
from libs.graphs.files import graph_paths, load_edge_graph
from libs.models.factory import backbone_config, for_sampling, graph_config, model_kind, tokenizer_config
from libs.models.autonat import AutoNAT
from libs.models.ka_maskgit import KAMaskGIT
from libs.models.ka_mig import KAMIG
from libs.models.maskgit import MaskGIT, maskgit_config
from libs.models.vqgan import VQGAN
from libs.sampling.decoding import generate, schedule_from_config
from libs.sampling.generation import PRECISIONS, class_labels, index_generators, to_uint8
from libs.training.objective import MaskedBatch, make_masked_batch, masked_token_loss, masking_options
from libs.training.trainer import freeze_for_mode, mode_kind

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
ALLOC_ROUND = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
# device memory of the four GPU sizes (24 GB: RTX 4090 / A10 class, 40 and 80 GB: A100 / H100, 141 GB: H200,
# 143,771 MiB); a batch fits when its estimated peak leaves CONTEXT and then FRAGMENTATION of the rest free, for
# what the estimate does not count (CUDA context and library workspaces; the caching allocator's reserve)
GPU_SIZES = {"24 GB": 24 * GIB, "40 GB": 40 * GIB, "80 GB": 80 * GIB, "141 GB": 143_771 * 2 ** 20}
CONTEXT = GIB
FRAGMENTATION = 0.10
SHADOW_LIMIT = 1 << 22  # elements: real values are carried along only for tensors up to this size
RELEASED_GRAPHS = REPO / "tests" / "compat" / "official_graph_prior"  # the released G_co / G_s (1024 codes)

aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
UNINITIALISED = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                 aten.new_empty.default, aten.new_empty_strided.default}  # outputs without values
UNIQUE_OPS = {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


# ----------------------------------------------------------------------------- the tracker


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive (each rounded up to `round_to`) after every operator, and their peak.

    Use inside a FakeTensorMode (`fake`), or on real tensors (fake=False: counting only): storages made by
    operators while the mode is active are counted until they are freed. `shadows` maps a tensor to a real CPU
    tensor with its values (see `data`); data-dependent operators use them, and without them answer as described in
    the module docstring, counted in `guessed` (operator name -> count). Raises RuntimeError for a unique() or
    boolean index whose values are unknown.
    """

    def __init__(self, round_to: int = ALLOC_ROUND, fake: bool = True):
        super().__init__()
        self.round_to, self.fake = round_to, fake
        self.current = self.peak = 0
        self.sizes = WeakIdKeyDictionary()  # storage -> [bytes counted]
        self.shadows = WeakIdKeyDictionary()  # tensor -> real CPU tensor of the same values
        self.guessed = collections.Counter()
        self.paused = 0

    def rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def reset_peak(self):
        self.peak = self.current

    def count(self, t):
        """Counts the storage of tensor `t` (once; a resized storage is counted at its new size)."""
        if not isinstance(t, torch.Tensor) or t.is_sparse or t.device.type == "meta":
            return  # the sparse GCN adjacency (under 2 MB) is left out
        st = t.untyped_storage()
        n = self.rounded(st.nbytes())
        box = self.sizes.get(st)
        if box is None:
            box = self.sizes[st] = [n]
            weakref.finalize(st, self._release, box)
            self.current += n
        elif box[0] != n:
            self.current += n - box[0]
            box[0] = n
        self.peak = max(self.peak, self.current)

    def _release(self, box):
        self.current -= box[0]

    def data(self, real: torch.Tensor, device="cpu") -> torch.Tensor:
        """A tensor on `device` (fake, when a FakeTensorMode is active) shaped like real CPU tensor `real`, counted,
        with `real` as its shadow when it is small."""
        out = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)
        if real.numel() <= SHADOW_LIMIT:
            self.shadows[out] = real
        return out

    @contextlib.contextmanager
    def suspended(self):
        """Operators pass through uncounted (e.g. real CPU work that prepares a model)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    # --- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or func is torch.ops.prim.device.default:  # no storage made
            return func(*args, **kwargs)
        if not self.fake:
            out = func(*args, **kwargs)  # real tensors: counted only
        else:
            out = self.fake_call(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            self.count(t)
        return out

    def fake_call(self, func, args, kwargs):
        """func on fake tensors: data-dependent operators answered from real values, which are propagated."""
        handled, out, args, kwargs = self.data_dependent(func, args, kwargs)
        if not handled:
            out = func(*args, **kwargs)
            self.propagate(func, args, kwargs, out)
        return out

    def shadow(self, t):
        """The real values of tensor `t`: its shadow, `t` itself when it is a real tensor, else None."""
        if not isinstance(t, torch.Tensor):
            return None
        return self.shadows.get(t) if isinstance(t, FakeTensor) else t

    def real_call(self, func, args, kwargs):
        """(True, func on the real values of its tensor arguments), or (False, None) when one has none."""
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(self.shadow(a) is None for a in flat):
            return False, None
        kwargs = {k: torch.device("cpu") if k == "device" and v is not None else v for k, v in kwargs.items()}
        with unset_fake_temporarily():  # real values live on the CPU, whatever device the fake tensors are on
            return True, func(*tree_map(self.shadow_or_value, args), **tree_map(self.shadow_or_value, kwargs))

    def shadow_or_value(self, a):
        return self.shadow(a) if isinstance(a, torch.Tensor) else a

    def like(self, real, device):
        """A fake (or real) tensor shaped like `real` on `device`, with `real` as its shadow."""
        out = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)
        self.shadows[out] = real
        return out

    def data_dependent(self, func, args, kwargs):
        """(handled, out, args, kwargs): operators whose output shape or value depends on tensor values."""
        if func is aten._local_scalar_dense.default:
            real = self.shadow(args[0])
            if real is not None:
                with unset_fake_temporarily():
                    return True, real.item(), args, kwargs
            self.guessed[str(func)] += 1
            return True, (True if args[0].dtype == torch.bool else 0), args, kwargs
        if func is aten.equal.default:
            known, real = self.real_call(func, args, kwargs)
            if not known:
                self.guessed[str(func)] += 1
            return True, real if known else True, args, kwargs
        if func in UNIQUE_OPS or func is aten.nonzero.default:
            known, real = self.real_call(func, args, kwargs)
            if not known and func is aten.nonzero.default:  # nothing non-zero: the answer of a check that passes
                self.guessed[str(func)] += 1
                real = torch.zeros(0, args[0].dim(), dtype=torch.long)
            if real is None:
                raise RuntimeError(f"{func}: the estimator does not know the values of a tensor {tuple(args[0].shape)}")
            device = args[0].device
            out = tree_map(lambda r: self.like(r, device) if isinstance(r, torch.Tensor) else r, real)
            return True, out, args, kwargs
        if func in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            return False, None, (args[0], self.long_indices(args[1]), *args[2:]), kwargs
        return False, None, args, kwargs

    def long_indices(self, indices):
        """Boolean indices replaced by the long indices of their True entries (from their real values)."""
        out = []
        for i in indices:
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                real = self.shadow(i)
                if real is None:
                    raise RuntimeError(f"a boolean index {tuple(i.shape)} whose values the estimator does not know")
                out += [self.like(r.contiguous(), i.device) for r in real.nonzero().unbind(1)]
            else:
                out.append(i)
        return out

    def propagate(self, func, args, kwargs, out):
        """Real values of the outputs (and of inputs written in place) of `func` on fake tensors, computed on the
        real values of its inputs when they all have them, nothing is random and every tensor involved is small;
        else written inputs lose theirs."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, FakeTensor)]
        written = [t for i, arg in enumerate(func._schema.arguments) if i < len(args)
                   and arg.alias_info is not None and arg.alias_info.is_write
                   for t in tree_flatten(args[i])[0] if isinstance(t, FakeTensor)]
        if not outs and not written:
            return
        small = all(t.numel() <= SHADOW_LIMIT for t in outs + written)
        seeded = torch.Tag.nondeterministic_seeded in func.tags or func in UNINITIALISED
        known, real = self.real_call(func, args, kwargs) if small and not seeded else (False, None)
        if not known:
            for t in written:
                self.shadows.pop(t, None)
            return
        for t, r in zip(outs, [r for r in tree_flatten(real)[0] if isinstance(r, torch.Tensor)]):
            self.shadows[t] = r


class CudaAutocastFp32(TorchFunctionMode):
    """Under CPU autocast, layer norm, group norm and interpolation as CUDA autocast runs them: inputs cast to float32
    (a copy of a low-precision input), float32 out. CPU autocast leaves them in the input's dtype; every other
    operator of these models is cast alike (tests/test_benchmark_tools.py compares them operator by operator)."""

    OPS = (F.layer_norm, F.group_norm, F.interpolate)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        low = (torch.float16, torch.bfloat16)
        to32 = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            return func(*tree_map(to32, args), **tree_map(to32, kwargs))


class CudaAttentionDropout(TorchFunctionMode):
    """scaled_dot_product_attention with dropout (MaskGIT's attention-probability dropout while training) as a GPU
    runs it: CUDA's flash and memory-efficient kernels apply the dropout inside and save the output, the log-sum-exp
    and a seed, where a CPU falls back to the math kernel, which keeps the [B,h,n,n] probabilities and dropout mask.
    Run without dropout here, the CPU flash kernel saves what CUDA's kernels save."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
                args = (*args[:4], 0.0, *args[5:])
            elif "dropout_p" in kwargs:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_code_paths():
    """What a CUDA device does differently, emulated on fake CPU tensors: CudaAutocastFp32, CudaAttentionDropout."""
    with CudaAutocastFp32(), CudaAttentionDropout():
        yield


# ----------------------------------------------------------------------------- where a workload runs


@dataclass
class Place:
    """Where a workload runs: fake tensors on `device` counted by `mem` (the estimates use fake CPU tensors), or
    real tensors on `device`."""
    device: torch.device
    mem: PeakMemory = None  # set: fake tensors
    cuda_like: bool = True  # fake tensors: take the code paths a CUDA device takes (AdamW's foreach)

    @property
    def fake(self) -> bool:
        return self.mem is not None

    @property
    def autocast_device(self) -> str:
        return "cpu" if self.fake else self.device.type

    def module(self, build: Callable, after_build: Callable = None):
        """build() as a module on the device: fake parameters and buffers of the right shapes, or real ones.

        `after_build(module)` runs before the move (outside the meta context when fake; e.g. set_graphs)."""
        if not self.fake:
            module = build()
            if after_build:
                after_build(module)
            return module.to(self.device)
        with self.outside():  # real meta tensors, real CPU graph preparation
            with torch.device("meta"):
                module = build()
            if after_build:
                after_build(module)
        memo = {}
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    if p not in memo:
                        memo[p] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=self.device),
                                                     p.requires_grad)
                    sub._parameters[name] = memo[p]
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=self.device)
        return module

    @contextlib.contextmanager
    def outside(self):
        """Real CPU work (inputs, graphs) that is neither faked nor counted."""
        if not self.fake:
            yield
            return
        with unset_fake_temporarily(), self.mem.suspended():
            yield

    def data(self, real: torch.Tensor) -> torch.Tensor:
        """A real CPU tensor (made inside `outside()`) on the device; fake: with its values kept as shadow."""
        return self.mem.data(real, self.device) if self.fake else real.to(self.device)

    def autocast(self, precision: str):
        dtype = PRECISIONS[precision]
        return torch.autocast(self.autocast_device, dtype=dtype or torch.float32, enabled=dtype is not None)


def random_edge_graph(num_nodes: int, per_node: int, seed: int):
    """(edge_index [2,E], edge_weight [E], num_nodes): `per_node` random neighbours and a self-loop per node."""
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(num_nodes).repeat_interleave(per_node + 1)
    dst = torch.cat([torch.arange(num_nodes)[:, None], torch.randint(0, num_nodes, (num_nodes, per_node),
                                                                      generator=g)], 1).view(-1)
    return torch.stack([src, dst]), torch.rand(src.numel(), generator=g) + 0.1, num_nodes


def graphs_for(config, device) -> dict:
    """Graphs of the model's sizes: the released G_co / G_s for 1024 codes (else random ones of the same density),
    and an all-zero G_p (its values do not change any shape)."""
    m, g = config.model, config.graph
    K = m.codebook_size
    graphs = {}
    for name, file_key, per_node in (("co", "co", 51), ("sim", "sim", 2)):
        if getattr(g, f"use_{name}"):
            graphs[name] = load_edge_graph(graph_paths(RELEASED_GRAPHS)[file_key]) if K == 1024 else \
                random_edge_graph(K, min(per_node, K - 1), seed=len(graphs))
    if g.use_incompat:
        graphs["incompat"] = torch.zeros(m.num_classes, m.seq_len, (K + 7) // 8, dtype=torch.uint8, device=device)
    return graphs


def token_network(place: Place, config, kind: str):
    """AutoNAT, KA-MIG, MaskGIT or KA-MaskGIT (libs.models.factory's kinds) of `config` (random weights) at
    `place`."""
    if kind == "autonat":
        return place.module(lambda: AutoNAT(backbone_config(config.model)))
    if kind == "maskgit":
        return place.module(lambda: MaskGIT(maskgit_config(config.model)))
    host, sizes = (KAMIG, backbone_config) if kind == "ka_mig" else (KAMaskGIT, maskgit_config)
    return place.module(lambda: host(sizes(config.model), graph_config(config.graph)),
                        lambda model: model.set_graphs(**graphs_for(config, "meta" if place.fake else "cpu")))


def build_optimizer(model, trained: set, train_cfg, foreach=None):
    """The trainer's AdamW: weight decay on the trained matrices, none on vectors (as Trainer.__init__)."""
    params = [p for n, p in model.named_parameters() if n in trained]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": train_cfg.weight_decay},
                              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                             lr=train_cfg.lr, betas=tuple(train_cfg.betas), foreach=foreach)


def masked_batch(config, batch: int, step: int, mask_token_id: int = None) -> MaskedBatch:
    """A real CPU training batch: random tokens, labels i mod C, masked as the trainer does (the config's masking
    and loss options; `mask_token_id` default K, AutoNAT's); the first b rows of every batch size are the same (so a
    larger batch holds a smaller one and the peak grows with the batch)."""
    m, t, chunk = config.model, config.train, 64
    parts = []
    for c in range(0, batch, chunk):
        g = torch.Generator().manual_seed(1_000_003 * step + c)
        n = min(chunk, batch - c)
        ids = torch.randint(0, m.codebook_size, (n, m.seq_len), generator=g)
        cls = torch.arange(c, c + n) % m.num_classes
        parts.append(make_masked_batch(ids, cls, m.codebook_size if mask_token_id is None else mask_token_id,
                                       m.num_classes, t.p_uncond, tuple(t.mask_beta), generator=g,
                                       **masking_options(t)))
    tensors = [f for f, v in vars(parts[0]).items() if isinstance(v, torch.Tensor)]
    return dataclasses.replace(parts[0], **{f: torch.cat([getattr(p, f) for p in parts]) for f in tensors})


# ----------------------------------------------------------------------------- the workloads


def training(place: Place, config, batch: int, steps: int = 1):
    """`steps` training steps of `config.train` (its mode and mixed precision) at `batch` per GPU: the tensor work of
    Trainer.train_step (autocast forward, masked loss, scaled backward, unscale, gradient norm, AdamW, EMA), which
    cannot itself run on fake tensors (its accelerate wrapper reads the loss on the host). AdamW's state is made
    first (a step on zero gradients), so every step runs as the trainer's steps after the first."""
    t = config.train
    model = token_network(place, config, mode_kind(config)).train()
    trained = set(freeze_for_mode(model, t.mode))
    optimizer = build_optimizer(model, trained, t, foreach=True if place.fake and place.cuda_like else None)
    params = [p for n, p in model.named_parameters() if n in trained]
    ema = [p.detach().float().clone() for p in params]
    precision = {"no": "fp32"}.get(t.mixed_precision, t.mixed_precision)
    scaler = torch.amp.GradScaler(place.autocast_device) if precision == "fp16" else None
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for step in range(steps):
        with place.outside():
            real = masked_batch(config, batch, step, model.mask_token_id)
        b = dataclasses.replace(real, **{f: place.data(v) for f, v in vars(real).items()
                                         if isinstance(v, torch.Tensor)})
        with place.autocast(precision):
            logits = model(b.input_ids, b.class_ids)
            if precision != "fp32":
                logits = logits.float()  # accelerate's prepared model returns fp32 outputs under mixed precision
            loss = masked_token_loss(logits, b, t.label_smoothing)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.norm(torch.stack([p.grad.detach().float().norm() for p in params]))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(t.ema_rate).add_(p.detach().float(), alpha=1 - t.ema_rate)
        optimizer.zero_grad(set_to_none=True)
        del b, logits, loss  # the trainer holds them to the end of its step too


@torch.no_grad()
def sampling(place: Place, config, batch: int, precision: str):
    """One batch of libs.sampling.generation.sample_images with the config's backbone and graphs (KA-MIG or
    KA-MaskGIT): FusionCache, the config's schedule (2 x batch rows per forward: generate batches the unconditional
    pass even at guidance 0), per-index generators, the tokenizer's fp32 decode, uint8 pixels."""
    model = token_network(place, config, model_kind(config, graphs=True)).eval().requires_grad_(False)
    tokenizer = place.module(lambda: VQGAN(tokenizer_config(config.tokenizer))).eval().requires_grad_(False)
    sampler = for_sampling(model)
    schedule = schedule_from_config(config.sample)
    with place.outside():
        cls = torch.from_numpy(class_labels(batch, config.model.num_classes)).long()
    cls = place.data(cls)
    generators = index_generators(range(batch), 0, "cpu" if place.fake else place.device)
    with place.autocast(precision):
        ids = generate(sampler, cls, schedule, seq_len=model.cfg.seq_len, mask_token_id=model.mask_token_id,
                       null_class_id=model.null_class_id, generator=generators)
    to_uint8(tokenizer.decode(ids).float(), config.sample.get("pixels", "truncate"))


@torch.no_grad()
def tokenizing(place: Place, config, batch: int):
    """libs.data.tokens.encode_images with flip: uint8 images [B,3,R,R] and their mirrors -> token ids [2B,L]."""
    tokenizer = place.module(lambda: VQGAN(tokenizer_config(config.tokenizer))).eval().requires_grad_(False)
    R = tokenizer.cfg.resolution
    with place.outside():
        images = torch.zeros(batch, 3, R, R, dtype=torch.uint8)
    images = place.data(images)
    x = images.float() / 255.0
    tokenizer.encode(torch.cat([x, x.flip(3)]))


@dataclass
class Workload:
    title: str
    config: str
    batch: int  # the paper's (or the scripts' default) batch per GPU
    run: Callable  # run(place, config, batch)
    unit: str = "images"


WORKLOADS = {
    "ka_mig_train": Workload("KA-MIG training, fp16 (frozen AutoNAT-L + graph modules, AdamW + EMA on those)",
                             "configs/ka_mig_l.py", 300, training),
    "autonat_pretrain": Workload("AutoNAT-L pretraining, fp16 (AdamW + EMA on all 194M parameters)",
                                 "configs/autonat_l.py", 256, training),
    "sample_fp32": Workload("KA-MIG sampling, T=8 + guidance, fp32 (scripts' default), + tokenizer decode",
                            "configs/ka_mig_l.py", 125, lambda p, c, b: sampling(p, c, b, "fp32")),
    "sample_bf16": Workload("KA-MIG sampling, T=8 + guidance, bf16 autocast, + tokenizer decode",
                            "configs/ka_mig_l.py", 125, lambda p, c, b: sampling(p, c, b, "bf16")),
    "tokenize": Workload("tokenizer encode, fp32 (extract_imagenet_feature.py: images + flips)",
                         "configs/ka_mig_l.py", 64, tokenizing, unit="images (x2 with flips)"),
    "ka_maskgit_train": Workload("KA-MaskGIT training, fp16 (frozen MaskGIT + graph modules, AdamW + EMA on those)",
                                 "configs/ka_maskgit.py", 300, training),
    "maskgit_pretrain": Workload("MaskGIT pretraining, fp16 (AdamW + EMA on all 172M parameters; the release's "
                                 "global batch 256 on one GPU)", "configs/maskgit.py", 256, training),
    "sample_ka_maskgit": Workload("KA-MaskGIT sampling, T=16 cosine, no guidance, fp32, + tokenizer decode",
                                  "configs/ka_maskgit.py", 125, lambda p, c, b: sampling(p, c, b, "fp32")),
}


# sample_bf16 is left out by default: sampling's peak is the tokenizer's fp32 decode, the same in both precisions
DEFAULT_WORKLOADS = ("ka_mig_train", "autonat_pretrain", "sample_fp32", "tokenize", "ka_maskgit_train",
                     "maskgit_pretrain", "sample_ka_maskgit")


# ----------------------------------------------------------------------------- estimates


def estimate(run: Callable, config, batch: int, round_to: int = ALLOC_ROUND, cuda_like: bool = True) -> PeakMemory:
    """Runs `run(place, config, batch)` on fake CPU tensors; the PeakMemory holds `peak` (bytes) and `guessed`.

    `round_to` / `cuda_like`: the CUDA allocator's rounding and CUDA's code paths (1 / False: a CPU's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fake tensors' data_ptr(), autocast notes
        policy = cuda_code_paths() if cuda_like else contextlib.nullcontext()
        with FakeTensorMode(), PeakMemory(round_to) as mem, policy:
            run(Place(torch.device("cpu"), mem, cuda_like), config, batch)
    return mem


def largest_batch(peak_of: Callable, budget: int, guess: int = 1, step: int = 1, limit: int = 1 << 20) -> int:
    """Largest batch b in [1, limit] with peak_of(b) <= budget, for peak_of non-decreasing in b; 0 if none.

    Brackets the answer from `guess` with steps that start at `step` and double, then bisects: 2 calls when the
    guess is the answer, about 2 log2(|answer - guess| / step) more otherwise."""
    fits = lambda b: peak_of(b) <= budget  # noqa: E731
    guess, step = max(1, min(guess, limit)), max(1, step)
    if fits(guess):
        lo, hi = guess, guess + step
        while hi <= limit and fits(hi):
            lo, step = hi, step * 2
            hi = lo + step
        if hi > limit:
            if fits(limit):
                return limit
            hi = limit
    else:
        lo, hi = guess - step, guess
        while lo >= 1 and not fits(lo):
            hi, step = lo, step * 2
            lo = hi - step
        if lo < 1:
            if not fits(1):
                return 0
            lo = 1
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memoised(fn: Callable) -> Callable:
    cache = {}

    def call(b):
        if b not in cache:
            cache[b] = fn(b)
        return cache[b]
    call.cache = cache
    return call


def usable(size: int) -> int:
    """Bytes of a GPU of `size` bytes that the estimated peak may take (CONTEXT, then FRAGMENTATION left free)."""
    return int((size - CONTEXT) * (1 - FRAGMENTATION))


def workload_table(names, sizes=GPU_SIZES, log=print) -> list:
    """Per workload: the peak at its batch and the largest batch that fits (`usable`) each GPU size of `sizes`."""
    rows = []
    for name in names:
        w = WORKLOADS[name]
        config = load_config_file(REPO / w.config)
        t0 = time.perf_counter()
        peak_of = memoised(lambda b: estimate(w.run, config, b).peak)
        at_batch = estimate(w.run, config, w.batch)
        peak_of.cache[w.batch] = at_batch.peak
        # the peak is close to affine in the batch: a guess from two points, then an exact search from it
        half = max(1, w.batch // 2)
        per_item = max(1.0, (peak_of(w.batch) - peak_of(half)) / (w.batch - half)) if w.batch > 1 else 1.0
        fixed = peak_of(w.batch) - per_item * w.batch
        largest = {}
        for label, size in sizes.items():
            budget = usable(size)
            largest[label] = largest_batch(peak_of, budget, max(1, int((budget - fixed) / per_item)))
        rows.append(dict(name=name, title=w.title, batch=w.batch, unit=w.unit, peak=at_batch.peak,
                         fixed=fixed, per_item=per_item, largest=largest, guessed=dict(at_batch.guessed),
                         evaluations=len(peak_of.cache), seconds=time.perf_counter() - t0))
        log(f"{name}: peak {at_batch.peak / GIB:.2f} GiB at batch {w.batch}; largest "
            + ", ".join(f"{k} {v}" for k, v in largest.items()) + f" ({len(peak_of.cache)} estimates, "
            f"{time.perf_counter() - t0:.0f} s)")
    return rows


def markdown_table(rows, sizes=GPU_SIZES) -> str:
    head = " | ".join(f"largest batch, {k}" for k in sizes)
    lines = [f"| workload (per GPU) | batch | estimated peak GiB | fixed GiB + MiB per item | {head} |",
             "|---|---|---|---|" + "---|" * len(sizes)]
    for r in rows:
        lines.append(f"| {r['title']} | {r['batch']} | {r['peak'] / GIB:.2f} | {r['fixed'] / GIB:.2f} + "
                     f"{r['per_item'] / 2 ** 20:.1f} | " + " | ".join(str(r['largest'][k]) for k in sizes) + " |")
    return "\n".join(lines) + (
        f"\n\nLargest batch: estimated peak <= (GPU memory - {CONTEXT / GIB:.0f} GiB) x {1 - FRAGMENTATION:.2f}; GPU "
        f"memory {', '.join(f'{k} = {v / GIB:.1f} GiB' for k, v in sizes.items())}.")


# ----------------------------------------------------------------------------- check against a real CPU run


def small_config():
    """The RSS check's config: AutoNAT pretraining at width 384, depth 8, 256 tokens, fp32, batch 16."""
    config = load_config_file(REPO / "configs/autonat_l.py")
    config.model.embed_dim, config.model.depth, config.model.num_heads = 384, 8, 6
    config.train.mixed_precision = "no"
    return config


def rss_bytes() -> int:
    """Resident set size of this process now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(batch: int):
    """Runs the small training config for real on the CPU; prints the peak RSS growth over the start and the peak
    of its tensors counted by PeakMemory (bytes)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = small_config()
    torch.zeros(1) @ torch.zeros(1)  # libraries loaded before the baseline
    before = rss_bytes()
    with PeakMemory(round_to=1, fake=False) as mem:
        training(Place(torch.device("cpu")), config, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT", json.dumps({"rss_growth": peak - before, "tensors": mem.peak}))


# glibc's malloc keeps freed blocks below a threshold that grows with the blocks freed; a fixed threshold returns
# every block of 128 KiB or more to the system when it is freed, so RSS follows the live memory more closely
MALLOC_VARIANTS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def check_rss(batch: int = 16) -> dict:
    """The estimator (CPU semantics: no rounding, CPU AdamW) against a real run of the same step on the CPU: the
    peak of its tensors and its peak RSS growth, under each of MALLOC_VARIANTS."""
    result = dict(batch=batch, estimated=estimate(training, small_config(), batch, round_to=1, cuda_like=False).peak)
    for name, env in MALLOC_VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--rss-child", str(batch)], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, **env})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"the real CPU run failed:\n{out.stderr[-3000:]}")
        result[name] = json.loads(lines[-1][len("RESULT "):])
    return result


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: {', '.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--check-rss", action="store_true", help="compare with a real CPU run's peak RSS")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        return rss_child(args.rss_child)
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown} (known: {', '.join(WORKLOADS)})")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = workload_table(names)
    print("\n" + markdown_table(rows))
    result = {"torch": torch.__version__, "rows": rows, "seconds": time.perf_counter() - t0}
    if args.check_rss:
        result["rss_check"] = check = check_rss()
        mib = lambda n: f"{n / 2 ** 20:.0f} MiB"  # noqa: E731
        print(f"\nRSS check (AutoNAT width 384, depth 8, 256 tokens, fp32 pretraining step, batch {check['batch']}, "
              f"CPU): estimated {mib(check['estimated'])}; the real run: "
              + "; ".join(f"{name}: tensors {mib(check[name]['tensors'])}, peak RSS growth "
                          f"{mib(check[name]['rss_growth'])}" for name in MALLOC_VARIANTS))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
