"""No host-device synchronisation inside a decoding step, and one per training step.

A GPU idles whenever the host waits for a value computed on it (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`,
`torch.equal`, an op whose output size depends on the data, a blocking copy from the host). Decoding runs on
fake CUDA tensors (tests/fake_cuda.py), where each of these is recorded or, inside the steps, raises
HostSyncError. The training step needs a backward pass, which fake CUDA tensors cannot run: its forward and
loss are checked on fake CUDA (tests/test_cuda_placement.py), and the whole step is counted on the CPU with
an instrument that records the same reads (only those a GPU run would make: the host-side batch indices and
the optimizer's step counters live on the CPU there too).
"""
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from libs.models.fusion_cache import FusionCache
from libs.models.ka_mig import KAMIG
from libs.sampling import decoding
from libs.sampling.decoding import generate, guidance_classes, host_remask_counts, maskgit_schedule, remask_counts
from libs.training import trainer as trainer_module
from tests.fake_cuda import (DATA_SHAPED, SCALAR_READS, CUDA, HostSyncError, PhaseWatch, StepRecord, fake_cuda,
                             repo_frame)
from tests.helpers import decoding_options, ka_mig_trainer, token_model

K, L, C = 32, 16, 4
OPTIONS = decoding_options()

# ----------------------------------------------------------------------------- what fake tensors refuse here

DATA_DEPENDENT = {"item": lambda x: x.sum().item(), "int": lambda x: int(x[0]), "float": lambda x: float(x[0]),
                  "bool": lambda x: bool(x[0] > 0), "tolist": lambda x: x.tolist(),
                  "equal": lambda x: torch.equal(x, x)}
DYNAMIC_SHAPE = {"nonzero": lambda x: x.nonzero(), "unique": lambda x: x.unique(),
                 "boolean mask": lambda x: x[x > 0]}


@pytest.mark.parametrize("name", list(DATA_DEPENDENT))
def test_fake_tensors_refuse_to_give_a_value(name):
    with FakeTensorMode():
        x = torch.ones(4, device="cuda")
        with pytest.raises(DataDependentOutputException):
            DATA_DEPENDENT[name](x)


@pytest.mark.parametrize("name", list(DYNAMIC_SHAPE))
def test_fake_tensors_refuse_data_dependent_shapes(name):
    with FakeTensorMode():
        x = torch.ones(4, device="cuda")
        with pytest.raises(DynamicOutputShapeException):
            DYNAMIC_SHAPE[name](x)


def test_fake_tensors_let_a_device_copy_through():
    with FakeTensorMode():
        x = torch.ones(4, device="cuda")
        assert x.cpu().device.type == "cpu"  # no error: the instrument has to catch copies itself


SYNCS = {**DATA_DEPENDENT, **DYNAMIC_SHAPE, "cpu": lambda x: x.cpu(), "to cpu": lambda x: x.to("cpu"),
         "tensor from the host": lambda x: x + torch.tensor(0.5, device="cuda"),
         "blocking upload": lambda x: x + torch.ones(4).to("cuda")}


@pytest.mark.parametrize("name", list(SYNCS))
def test_the_instrument_raises_on_every_sync_inside_a_step(name):
    with fake_cuda() as fc:
        x = torch.ones(4, device="cuda")
        fc.reads.phase = "steps"
        with pytest.raises(HostSyncError):
            SYNCS[name](x)


def test_the_instrument_lets_device_work_and_non_blocking_uploads_pass():
    with fake_cuda() as fc:
        x = torch.ones(4, device="cuda")
        fc.reads.phase = "steps"
        y = (x * 2).argmax() + x.topk(2).values.sum() + torch.full((), 0.5, device="cuda")
        y = y + torch.ones(4).to("cuda", non_blocking=True)
    assert y.device == CUDA and fc.reads.reads == []


# ----------------------------------------------------------------------------- decoding


def decode_watched(kind, schedule, edit=False):
    """generate() of a fake-CUDA model with the steps watched; returns (HostReads, model calls, ids)."""
    model = token_model(kind)
    with fake_cuda() as fc, torch.no_grad():
        fc.to_cuda(model)
        sampler = PhaseWatch(FusionCache(model) if kind == "ka_mig" else model, fc.reads)
        with torch.device("cuda"), fc.quiet():
            cls = torch.tensor([0, 1, 1, 3])
            init_ids = torch.randint(0, K, (4, L)) if edit else None
            known = (torch.arange(L) % 3 == 0).expand(4, -1) if edit else None
        ids = generate(sampler, cls, schedule, seq_len=L, mask_token_id=K, null_class_id=C,
                       generator=fc.cuda_generators(4), record=StepRecord(fc.reads, schedule.steps),
                       init_ids=init_ids, known=known)
    return fc.reads, sampler.calls, ids


def only_the_decoders_preparation(reads) -> bool:
    """True when every read before the first step is the decoder's or the KA-MIG cache's own preparation."""
    return all(r.where.startswith(("libs/sampling/decoding.py", "libs/models/fusion_cache.py")) for r in reads)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_no_decoding_step_reads_the_device(name):
    reads, calls, ids = decode_watched("ka_mig", OPTIONS[name])  # any read inside the steps raises
    assert calls == OPTIONS[name].steps and ids.device == CUDA and ids.shape == (4, L)
    assert only_the_decoders_preparation(reads.in_phase("setup")), reads.reads
    assert len(reads.in_phase("after")) <= 1, reads.reads  # the non-finite flags, read once after the loop


@pytest.mark.parametrize("kind", ["autonat", "ka_mig"])
def test_no_editing_step_reads_the_device(kind):
    reads, calls, _ = decode_watched(kind, OPTIONS["maskgit-linear"], edit=True)
    assert calls == 4 and only_the_decoders_preparation(reads.in_phase("setup")), reads.reads


def test_the_backbone_needs_no_read_before_decoding():
    reads, calls, _ = decode_watched("autonat", OPTIONS["autonat"])
    assert calls == 8 and reads.in_phase("setup") == []


def test_ka_mig_reads_its_classes_once_before_the_steps():
    reads, _, _ = decode_watched("ka_mig", OPTIONS["maskgit-linear"])
    assert [r.what for r in reads.in_phase("setup")] == ["unique"]
    assert "fusion_cache.py" in reads.in_phase("setup")[0].where


def test_a_sync_planted_in_a_step_is_caught(monkeypatch):
    real = decoding.remask_lowest  # as before: the largest count read back from the device at every step
    monkeypatch.setattr(decoding, "remask_lowest", lambda s, c, n, m, n_max=None: real(s, c, n, m))
    with pytest.raises(HostSyncError, match="decoding.py"):
        decode_watched("autonat", OPTIONS["maskgit-linear"])


def test_class_ids_compared_at_every_step_are_caught(monkeypatch):
    monkeypatch.setattr(FusionCache, "same_class_tensor", lambda self, class_ids: False)  # as before
    with pytest.raises(HostSyncError, match="torch.equal"):
        decode_watched("ka_mig", OPTIONS["maskgit-linear"])


# ----------------------------------------------------------------------------- what replaced the reads


def all_ratios() -> list:
    """(ratio, dtype) of every non-final step of the maskgit schedules T = 1..32 and of the AutoNAT strategy."""
    out = [(r, "float32") for T in range(1, 33) for r in maskgit_schedule(T, 1.0).ratios]
    return out + [(r, "float64") for r in OPTIONS["autonat"].ratios] + [(0.5, "float64"), (0.999, "float64")]


def test_host_remask_counts_equal_the_device_counts():
    n_unknown, n_masked = np.meshgrid(np.arange(0, 300), np.arange(1, 300), indexing="ij")
    keep = n_masked <= np.maximum(n_unknown, 1)  # a row never has more [MASK] than unknown tokens
    n_unknown, n_masked = n_unknown[keep], n_masked[keep]
    for ratio, dtype in all_ratios():
        host = host_remask_counts(n_unknown, n_masked, ratio, dtype)
        device = remask_counts(torch.from_numpy(n_unknown), torch.from_numpy(n_masked), ratio, dtype)
        assert np.array_equal(host, device.numpy()), (ratio, dtype)


def test_the_host_mirror_follows_an_editing_run():
    model = token_model("autonat")
    init = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(0))
    known = torch.rand(4, L, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.0], [0.3], [0.8], [1.0]])
    record, schedule = [], OPTIONS["maskgit-linear"]
    with torch.no_grad():
        generate(model, torch.arange(4), schedule, seq_len=L, mask_token_id=K, null_class_id=C, record=record,
                 init_ids=init, known=known)
    host = n_unknown = (~known).sum(1).numpy()
    for t, ids in enumerate(record[:-1]):  # [MASK] counts after each non-final step
        host = host_remask_counts(n_unknown, host, schedule.ratios[t], schedule.ratio_dtype)
        assert np.array_equal((ids == K).sum(1).numpy(), host)
    assert (record[-1] == K).sum() == 0


def test_guidance_classes_are_one_tensor_per_run():
    cls = torch.tensor([0, 2, 1])
    both = guidance_classes(cls, C)
    assert guidance_classes(cls, C) is both and both.tolist() == [0, 2, 1, C, C, C]
    assert guidance_classes(cls.clone(), C) is not both
    cls[1] = 3  # changed in place: new ids
    assert guidance_classes(cls, C).tolist() == [0, 3, 1, C, C, C]


def test_fusion_cache_reuses_terms_for_the_same_tensor_and_sees_changes(monkeypatch):
    model = token_model("ka_mig")
    calls = []
    real = KAMIG.class_prior
    monkeypatch.setattr(KAMIG, "class_prior", lambda self, c: calls.append(len(c)) or real(self, c))
    ids = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([0, 2, 2])
    with torch.no_grad():
        cache = FusionCache(model)
        first = cache(ids, cls)
        assert cache.same_class_tensor(cls) and torch.equal(cache(ids, cls), first)  # reused, ids not read
        assert torch.equal(cache(ids, cls.clone()), first)  # another tensor: compared, equal, reused
        assert torch.equal(cache(ids, cls), first) and calls == [2]  # two distinct classes, computed once
        cls[0] = 3  # in place: the same tensor now holds other classes
        assert not cache.same_class_tensor(cls)
        torch.testing.assert_close(cache(ids, cls), model(ids, cls), atol=1e-5, rtol=0)
    assert len(calls) == 3  # recomputed for the cache, and once more by the model itself


# ----------------------------------------------------------------------------- the training step


class StepReads(TorchDispatchMode):
    """Host reads of a training step run on the CPU, as a GPU run would make them: scalar reads, torch.equal,
    data-shaped ops, .cpu(), .tolist(), .numpy(); not those of tensors that stay on the host in a GPU run too
    (the step's batch indices, the optimizer's step counters)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.reads, self.muted, self.host = trainer, [], 0, set()

    def is_host(self, t) -> bool:
        steps = {id(s["step"]) for s in self.trainer.optimizer.state.values() if "step" in s}
        return id(t) in steps or (t.layout == torch.strided and t.untyped_storage().data_ptr() in self.host)

    def record(self, what, t):
        if not self.muted and not self.is_host(t):
            self.reads.append(f"{what} at {repo_frame(skip_functions=('record', 'counted', '__torch_dispatch__'))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SCALAR_READS:
            self.record(SCALAR_READS[func], args[0])
        elif func in DATA_SHAPED:
            self.record(DATA_SHAPED[func], args[0])
        elif func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.record("boolean-mask indexing", args[0])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate allows one mixed precision per process: these tests start and end with none chosen."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def reads_of_a_training_step(trainer) -> list:
    """The host reads of one Trainer.train_step after a first one (which creates the optimizer state)."""
    trainer.train_step()
    reads = StepReads(trainer)
    real_indices = trainer.batches.indices

    def host_indices(step):  # a CPU permutation in a GPU run too: not a device read
        reads.muted += 1
        try:
            idx = real_indices(step)
        finally:
            reads.muted -= 1
        reads.host.add(idx.untyped_storage().data_ptr())
        return idx

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.batches, "indices", host_indices)
        for name in ("tolist", "cpu", "numpy"):  # no dispatch on the CPU: counted here
            patch.setattr(torch.Tensor, name, counted_method(reads, name))
        with reads:
            trainer.train_step()
    return reads.reads


def counted_method(reads: StepReads, name: str):
    """torch.Tensor.<name> that records one read (and none of its own inner ops)."""
    real = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        reads.record(f".{name}()", self)
        reads.muted += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            reads.muted -= 1

    return counted


@pytest.mark.parametrize("train", [{}, {"grad_accum": 2}, {"grad_clip": 0.0}, {"mixed_precision": "bf16"}],
                         ids=["fp32", "grad_accum", "no-clip", "bf16"])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_training_step_reads_the_device_once(tmp_path, train):
    trainer, _ = ka_mig_trainer(tmp_path, n_steps=10, **train)
    reads = reads_of_a_training_step(trainer)
    assert len(reads) == 1 and "loss_value, norm_value, masked = " in reads[0], reads


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_pretraining_step_reads_the_device_once(tmp_path):
    from libs.training.trainer import Trainer
    from tests.helpers import synthetic_tokens, tiny_config
    tokens, labels = synthetic_tokens()
    trainer = Trainer(tiny_config(tmp_path, "pretrain", n_steps=10), tokens, labels)
    reads = reads_of_a_training_step(trainer)
    assert len(reads) == 1 and "loss_value, norm_value, masked = " in reads[0], reads


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_read_planted_in_the_loss_is_counted(tmp_path, monkeypatch):
    real = trainer_module.masked_token_loss
    monkeypatch.setattr(trainer_module, "masked_token_loss", lambda logits, batch, s: real(logits, batch, s) * (
        1.0 if float(batch.mask.sum()) > 0 else 0.0))  # a host read per micro-batch
    trainer, _ = ka_mig_trainer(tmp_path, n_steps=10)
    reads = reads_of_a_training_step(trainer)
    assert len(reads) == 2 and "test_host_sync.py" in reads[0], reads


# ----------------------------------------------------------------------------- MaskGIT and KA-MaskGIT


def maskgit_decode_watched(kind, guidance=None):
    """libs.sampling.maskgit_decode.decode (4 steps) of a fake-CUDA MaskGIT / KA-MaskGIT (its FusionCache) with
    the steps watched; returns (HostReads, model calls)."""
    from libs.sampling.maskgit_decode import decode as release_decode
    model = token_model(kind)
    with fake_cuda() as fc, torch.no_grad():
        fc.to_cuda(model)
        sampler = PhaseWatch(FusionCache(model) if kind == "ka_maskgit" else model, fc.reads)
        with torch.device("cuda"), fc.quiet():
            cls = torch.tensor([0, 1, 1, 3])
        release_decode(sampler, cls, seq_len=L, mask_token_id=K + C, steps=4, null_class_id=C, guidance=guidance,
                       generator=fc.cuda_generators(4), record=StepRecord(fc.reads, 4))
    return fc.reads, sampler.calls


@pytest.mark.parametrize("kind,guidance", [("maskgit", None), ("ka_maskgit", None), ("ka_maskgit", [1.0] * 4)],
                         ids=["maskgit", "ka_maskgit", "ka_maskgit-guided"])
def test_no_maskgit_decode_step_reads_the_device(kind, guidance):
    reads, calls = maskgit_decode_watched(kind, guidance)  # any read inside the steps raises
    assert calls == 4
    setup = [(r.what, r.where.split(":")[0]) for r in reads.in_phase("setup")]
    assert setup == ([] if kind == "maskgit" else [("unique", "libs/models/fusion_cache.py")]), reads.reads
    assert [r.where.split(":")[0] for r in reads.in_phase("after")] == ["libs/nonfinite.py"]  # the flags, once


def test_a_sync_planted_in_a_maskgit_decode_step_is_caught(monkeypatch):
    from libs.sampling import maskgit_decode
    real = maskgit_decode.remask
    monkeypatch.setattr(maskgit_decode, "remask",
                        lambda conf, lengths: real(conf, lengths.clamp(max=int(lengths.max()))))  # a read per step
    with pytest.raises(HostSyncError, match="scalar read"):
        maskgit_decode_watched("maskgit")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_maskgit_pretraining_step_reads_the_device_once(tmp_path):
    """configs/tiny_maskgit.py: the cosine masking with its minimum rate and the per-sample loss add no read."""
    from libs.config import load_config_file
    from libs.training.trainer import Trainer
    from tests.helpers import synthetic_tokens
    config = load_config_file("configs/tiny_maskgit.py")
    config.output_dir, config.train.log_interval, config.train.n_steps = str(tmp_path / "out"), 1000, 10
    trainer = Trainer(config, *synthetic_tokens())
    assert type(trainer.unwrapped).__name__ == "MaskGIT" and trainer.config.train.loss_average == "samples"
    reads = reads_of_a_training_step(trainer)
    assert len(reads) == 1 and "loss_value, norm_value, masked = " in reads[0], reads
