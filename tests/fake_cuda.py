"""Fake CUDA for the CPU-only test suite: models that claim a GPU, and an instrument for host-device syncs.

`torch._subclasses.fake_tensor.FakeTensorMode` runs every op on metadata only: a real CPU model moved with
`.to("cuda")` inside it (as the scripts move theirs) holds fake tensors on cuda:0 without any GPU, inputs made
under `torch.device("cuda")` too, and an op that mixes a CUDA tensor with a (non-scalar) CPU one raises
FakeTensorDeviceMismatchError, as on a GPU. Measured with this torch (tests/test_host_sync.py checks it): under
fake tensors `.item()`, `int()`, `float()`, `bool()`, `.tolist()` and `torch.equal` raise
DataDependentOutputException, and `nonzero`, `unique` and boolean-mask indexing raise
DynamicOutputShapeException; but `.cpu()` silently gives a fake CPU tensor, a CPU index into a CUDA tensor
passes, a CPU generator passes for a CUDA one, and sparse products have no fake kernel at all.

`fake_cuda()` closes those gaps with two instruments:

- `HostReads` (a dispatch mode inside the fake mode) records every host read of a CUDA tensor: scalar reads,
  `torch.equal`, ops whose output shape depends on the data, device-to-host copies and blocking
  host-to-device copies (both wait for the GPU's queue). In a phase listed in `strict` a read raises
  HostSyncError at once; elsewhere it is recorded and answered with a stand-in (0, False, an empty result, a
  "no duplicates" unique) so the code runs on. It raises PlacementError for a CPU tensor used as an index into
  a CUDA one, for `.numpy()` of a CUDA tensor, and for a sparse product whose operands sit on different
  devices; sparse x dense products get an empty result of the right shape (their values are never needed).
- `GeneratorCheck` (a function mode) fails a random call whose generator is for another device than the
  tensor it fills; `cuda_generators(n)` gives CPU generators that stand for CUDA ones (a CUDA generator cannot
  be made without a driver).
"""
import contextlib
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)
REPO = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense.default: "scalar read (.item/int/float/bool)",
                aten.equal.default: "torch.equal"}
DATA_SHAPED = {aten.nonzero.default: "nonzero", aten._unique2.default: "unique", aten.unique_dim.default: "unique",
               aten.unique_consecutive.default: "unique_consecutive", aten.masked_select.default: "masked_select",
               aten.repeat_interleave.Tensor: "repeat_interleave", aten._coalesce.default: "sparse coalesce"}
COPIES = (aten._to_copy.default, aten.copy_.default)
NUMPY_DTYPES = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                torch.int32: np.int32, torch.int64: np.int64, torch.float16: np.float16, torch.bfloat16: np.float32,
                torch.float32: np.float32, torch.float64: np.float64}
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class HostSyncError(AssertionError):
    """A host read of a CUDA tensor (a GPU sync) where none is allowed."""


class PlacementError(AssertionError):
    """A tensor on the wrong device that fake tensors alone let through."""


@dataclass
class Read:
    what: str
    where: str  # innermost repository frame: path:line and its code
    phase: str

    def __str__(self):
        return f"{self.what} at {self.where} ({self.phase})"


def repo_frame(skip_functions=()) -> str:
    """'path:line  code' of the innermost stack frame in the repository outside tests/fake_cuda.py (and
    outside functions named in `skip_functions`: another instrument's own)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if (REPO in path.parents and ".venv" not in path.parts and path.name != "fake_cuda.py"
                and frame.name not in skip_functions):
            return f"{path.relative_to(REPO)}:{frame.lineno}  {(frame.line or '').strip()}"
    return "(outside the repository)"


def is_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def stand_in_scalar(t: torch.Tensor):
    """The value a stand-in read answers: False, 0 or 0.0 by dtype."""
    if t.dtype == torch.bool:
        return False
    return 0.0 if (t.is_floating_point() or t.is_complex()) else 0


def stand_in_list(t: torch.Tensor):
    """Nested Python list of stand-in scalars with t's shape."""
    return np.full(tuple(t.shape), stand_in_scalar(t), dtype=object).tolist() if t.dim() else stand_in_scalar(t)


def copy_devices(func, args, kwargs):
    """(source device, target device, non_blocking) of a _to_copy / copy_ call."""
    if func is aten._to_copy.default:
        src = args[0]
        return src.device, torch.device(kwargs.get("device") or src.device), bool(kwargs.get("non_blocking"))
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return src.device, dst.device, bool(non_blocking)


class HostReads(TorchDispatchMode):
    """Records the host reads of CUDA tensors (see the module docstring); `reads` lists them in order."""

    def __init__(self, strict=("steps",)):
        super().__init__()
        self.reads, self.phase, self.strict, self.muted = [], "setup", set(strict), 0

    def record(self, what: str):
        read = Read(what, repo_frame(), self.phase)
        if self.phase in self.strict:
            raise HostSyncError(f"host read inside the {self.phase} phase: {read}")
        self.reads.append(read)

    def in_phase(self, phase: str) -> list:
        return [r for r in self.reads if r.phase == phase]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.muted:
            return func(*args, **kwargs)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_gpu = any(is_cuda(t) for t in tensors)
        if func in SCALAR_READS:
            if on_gpu:
                self.record(SCALAR_READS[func])
            return self.answer(func, args, kwargs, lambda: stand_in_scalar(args[0]))
        if func in DATA_SHAPED:
            if on_gpu:
                self.record(DATA_SHAPED[func])
            return self.answer(func, args, kwargs, lambda: self.data_shaped_stand_in(func, args, kwargs))
        if func in COPIES:
            src, dst, non_blocking = copy_devices(func, args, kwargs)
            if src.type == "cuda" and dst.type == "cpu":
                self.record("device-to-host copy")
            elif src.type == "cpu" and dst.type == "cuda" and not non_blocking:
                self.record("blocking host-to-device copy (waits for the GPU's queue)")
        if func in INDEXING:
            return self.indexing(func, args, kwargs)
        if func is aten._sparse_addmm.default:
            return self.sparse_product(args)
        return func(*args, **kwargs)

    def answer(self, func, args, kwargs, stand_in):
        """func's result where fake tensors know it (constants, real tensors), else the stand-in."""
        try:
            return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return stand_in()

    @staticmethod
    def data_shaped_stand_in(func, args, kwargs):
        """An answer of the right kind for an op whose output shape depends on the data."""
        x = args[0]
        if func in (aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default):
            flat = x.flatten()  # "every value distinct"
            inverse = torch.arange(flat.numel(), device=x.device).view(x.shape)
            return flat, inverse, torch.ones(flat.numel(), dtype=torch.long, device=x.device)
        if func is aten.nonzero.default:
            return torch.empty((0, x.dim()), dtype=torch.long, device=x.device)
        raise NotImplementedError(f"no stand-in for {func} under fake tensors")

    def indexing(self, func, args, kwargs):
        """Index ops: a CPU index into a CUDA tensor is a placement error; a boolean mask is data-shaped."""
        x, indices = args[0], args[1]
        for index in (i for i in indices if isinstance(i, torch.Tensor)):
            if index.dim() and index.device != x.device:
                raise PlacementError(f"a {index.device} index into a {x.device} tensor at {repo_frame()} (on a "
                                     f"GPU a copy of the index, and a sync)")
        masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
        if not masks:
            return func(*args, **kwargs)
        if func is aten.index.Tensor:
            if is_cuda(x):
                self.record("boolean-mask indexing")
            return self.answer(func, args, kwargs, lambda: x.new_empty((0,) + tuple(x.shape[masks[0].dim():])))
        if is_cuda(x):
            self.record("boolean-mask assignment")
        return self.answer(func, args, kwargs, lambda: x if func is not aten.index_put.default else x.clone())

    @staticmethod
    def sparse_product(args):
        """beta*self + alpha*(sparse @ dense): devices checked, an empty result of the right shape."""
        out, sparse, dense = args[0], args[1], args[2]
        devices = {out.device, sparse.device, dense.device}
        if len(devices) > 1:
            raise PlacementError(f"sparse product across devices {sorted(map(str, devices))} at {repo_frame()}")
        return torch.empty(out.shape, dtype=out.dtype, device=out.device)


class GeneratorCheck(TorchFunctionMode):
    """Fails a random call whose generator (or the CUDA device it stands for) differs from the result's device."""

    def __init__(self):
        super().__init__()
        self.stands_for = {}  # id(CPU generator) -> the device it stands for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and isinstance(out, torch.Tensor):
            device = self.stands_for.get(id(generator), generator.device)
            if device.type != out.device.type:
                raise PlacementError(f"a {device} generator fills a {out.device} tensor at {repo_frame()} (a "
                                     f"GPU refuses that)")
        return out


@contextlib.contextmanager
def tensor_methods_checked(reads: HostReads):
    """Tensor.tolist (one transfer, one read) and Tensor.numpy (CPU only) as a GPU would treat them."""
    tolist, fake_tolist, numpy = torch.Tensor.tolist, FakeTensor.tolist, torch.Tensor.numpy

    def checked_tolist(self):
        if is_cuda(self):
            reads.record("device-to-host copy (.tolist)")
        if not isinstance(self, FakeTensor):
            return tolist(self)
        reads.muted += 1  # one transfer, not one read per element (FakeTensor.tolist reads element-wise)
        try:
            return fake_tolist(self)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return stand_in_list(self)
        finally:
            reads.muted -= 1

    def checked_numpy(self, *args, **kwargs):
        if is_cuda(self):
            raise PlacementError(f".numpy() of a CUDA tensor at {repo_frame()} (TypeError on a GPU: .cpu() first)")
        if not isinstance(self, FakeTensor):
            return numpy(self, *args, **kwargs)
        return np.zeros(tuple(self.shape), dtype=NUMPY_DTYPES[self.dtype])  # a stand-in of the right kind

    torch.Tensor.tolist, FakeTensor.tolist, torch.Tensor.numpy = checked_tolist, checked_tolist, checked_numpy
    try:
        yield
    finally:
        torch.Tensor.tolist, FakeTensor.tolist, torch.Tensor.numpy = tolist, fake_tolist, numpy


@dataclass
class FakeCuda:
    """What fake_cuda() yields: the fake mode, the host-read instrument and the generator check."""
    mode: FakeTensorMode
    reads: HostReads
    generators: GeneratorCheck

    def to_cuda(self, module):
        """The module moved to fake cuda:0 the way the scripts move theirs (module.to; copies not recorded).

        Moving a built module, rather than building it under torch.device("cuda"), also catches a CPU tensor
        kept as a plain attribute, which module.to leaves behind.
        """
        with self.quiet():
            return module.to(CUDA)

    @contextlib.contextmanager
    def quiet(self):
        """Nothing recorded inside (the test's own set-up: inputs uploaded from the host)."""
        self.reads.muted += 1
        try:
            yield
        finally:
            self.reads.muted -= 1

    def cuda_generators(self, n: int, seed: int = 0) -> list:
        """n seeded CPU generators that stand for CUDA generators."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        for g in gens:
            self.generators.stands_for[id(g)] = CUDA
        return gens


@contextlib.contextmanager
def fake_cuda(strict=("steps",)):
    """FakeTensorMode (real CPU tensors may enter: they become fake) with HostReads and GeneratorCheck on."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    reads, generators = HostReads(strict), GeneratorCheck()
    with warnings.catch_warnings():
        # FusionCache compares buffer data pointers (all 0 for fake tensors): harmless here
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        with mode, reads, generators, tensor_methods_checked(reads):
            yield FakeCuda(mode, reads, generators)


@contextlib.contextmanager
def cuda_autocast_allowed():
    """torch.autocast("cuda") switched on although no GPU is present (it asks torch.cuda whether one is)."""
    with mock.patch("torch.cuda.is_available", lambda: True), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True):
        yield


class PhaseWatch:
    """Wraps a token model: its first call starts the 'steps' phase of `reads` (attributes pass through)."""

    def __init__(self, model, reads: HostReads):
        self.model, self.reads, self.calls = model, reads, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.reads.phase = "steps"
        return self.model(*args, **kwargs)


class StepRecord(list):
    """A `record` list for generate(): after the last of `steps` appends, the phase of `reads` is 'after'."""

    def __init__(self, reads: HostReads, steps: int):
        super().__init__()
        self.reads, self.steps = reads, steps

    def append(self, item):
        super().append(item)
        if len(self) == self.steps:
            self.reads.phase = "after"
