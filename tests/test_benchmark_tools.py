"""benchmarks.memory (peak memory estimated on fake tensors, largest-batch search) and benchmarks.gpu_acceptance
(its refusal without a GPU, its checks run on tiny models on the CPU)."""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import gpu_acceptance, memory
from libs.config import load_config_file
from libs.errors import UserError
from libs.models.autonat import AutoNAT
from libs.models.factory import backbone_config, tokenizer_config
from libs.models.vqgan import VQGAN
from libs.training.objective import masked_token_loss
from libs.training.trainer import freeze_for_mode
from tests.helpers import REPO


def tiny(mode="pretrain", precision="no"):
    config = load_config_file(REPO / "configs" / "tiny.py")
    config.train.mode, config.train.mixed_precision = mode, precision
    return config


def tiny_maskgit(mode="pretrain", precision="no"):
    """configs/tiny_ka_maskgit.py: a tiny MaskGIT with the graphs and the release's objective."""
    config = load_config_file(REPO / "configs" / "tiny_ka_maskgit.py")
    config.train.mode, config.train.mixed_precision = mode, precision
    return config


def real_count(run, config, batch) -> int:
    """Peak bytes of `run` on real CPU tensors, counted by PeakMemory (no rounding)."""
    with memory.PeakMemory(round_to=1, fake=False) as mem:
        run(memory.Place(torch.device("cpu")), config, batch)
    return mem.peak


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU, fake tensors' data_ptr()
        yield


# ----------------------------------------------------------------------------- the tracker


def test_peak_memory_counts_live_storages_exactly():
    with FakeTensorMode(), memory.PeakMemory(round_to=1) as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        view = b[10:].view(-1, 10)  # a view: no new storage
        assert mem.current == 8000
        del a
        assert mem.current == 4000
        c = torch.empty(10, dtype=torch.float16)  # 20 bytes
        assert (mem.current, mem.peak) == (4020, 8000)
        del b, view, c
        assert mem.current == 0
    with FakeTensorMode(), memory.PeakMemory(round_to=512) as mem:  # the CUDA allocator's blocks
        x, y = torch.empty(10), torch.empty(129)  # 40 and 516 bytes
        assert mem.current == 512 + 1024
        del x, y


def test_peak_memory_agrees_with_memtracker_on_a_training_step():
    """torch's MemTracker runs this workload (every parameter trained, the model called once): same peak."""
    with FakeTensorMode():
        tracker = MemTracker()
        with tracker, memory.PeakMemory(round_to=1) as mem:
            memory.training(memory.Place(torch.device("cpu"), mem, cuda_like=False), tiny(), 8)
    assert mem.peak > 0
    assert tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] == mem.peak


@pytest.mark.parametrize("workload, config", [
    ("ka_mig_train", tiny("ka_mig", "fp16")),  # unique classes, boolean loss mask, loss scaler, AdamW steps
    ("sample_bf16", tiny()),                     # FusionCache class cache, decoding, tokenizer decode
    ("tokenize", tiny()),
    ("ka_maskgit_train", tiny_maskgit("ka_mig", "fp16")),  # cosine masks, per-sample loss
    ("sample_ka_maskgit", tiny_maskgit()),  # KA-MaskGIT's FusionCache, the maskgit schedule
], ids=["ka_mig_train", "sample_bf16", "tokenize", "ka_maskgit_train", "sample_ka_maskgit"])
def test_estimate_on_fake_tensors_equals_a_real_run(workload, config):
    """The estimate (fake tensors, real values only for the inputs) against the same workload on real tensors."""
    run = memory.WORKLOADS[workload].run
    estimate = memory.estimate(run, config, 8, round_to=1, cuda_like=False)
    real = real_count(run, config, 8)
    assert abs(estimate.peak - real) <= 0.005 * real, (estimate.peak, real)


@pytest.mark.parametrize("mode", ["pretrain", "ka_mig"])
def test_training_estimate_exceeds_its_state_and_grows_with_the_batch(mode):
    """Lower bound: parameters + gradients, AdamW's two moments and the EMA of the trained ones, all fp32."""
    config = tiny(mode)
    peaks = [memory.estimate(memory.training, config, b, round_to=1).peak for b in (1, 2, 4, 8)]
    assert peaks == sorted(set(peaks))  # strictly increasing
    model = AutoNAT(backbone_config(config.model))
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = n_all if mode == "pretrain" else sum(p.numel() for p in model.mlm_layer.parameters())
    if mode == "ka_mig":  # + the graph modules (trained) and their buffers
        with FakeTensorMode(), memory.PeakMemory() as mem:
            ka_mig = memory.token_network(memory.Place(torch.device("cpu"), mem), config, "ka_mig")
        n_graph = sum(p.numel() for p in ka_mig.graph_layer.parameters())
        n_all, n_trained = n_all + n_graph, n_trained + n_graph
    assert peaks[0] >= 4 * n_all + (4 + 8 + 4) * n_trained


# ----------------------------------------------------------------------------- largest batch


def test_largest_batch_matches_a_brute_force_scan():
    config = tiny()
    peak_of = memory.memoised(lambda b: memory.estimate(memory.tokenizing, config, b).peak)
    n = 24
    peaks = [peak_of(b) for b in range(1, n + 1)]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]
    budgets = [peaks[0] - 1, peaks[0], (peaks[4] + peaks[5]) // 2, peaks[11], peaks[-1] - 1, peaks[-1]]
    for budget in budgets:
        brute = max([b for b in range(1, n + 1) if peak_of(b) <= budget], default=0)
        for guess in (1, 7, n):
            assert memory.largest_batch(peak_of, budget, guess, limit=n) == brute, (budget, guess)


def test_largest_batch_search_steps_on_a_known_function():
    """Every branch of the bracket (up, down, to the limit, nothing fits) on peak(b) = 10 b (+5 past 60)."""
    peak = lambda b: 10 * b + (5 if b > 60 else 0)  # noqa: E731
    for budget, want in [(9, 0), (10, 1), (599, 59), (600, 60), (614, 60), (615, 61), (10 ** 9, 1000)]:
        for guess, step in [(1, 1), (50, 1), (500, 1), (1000, 64), (3, 8)]:
            assert memory.largest_batch(peak, budget, guess, step, limit=1000) == want, (budget, guess, step)


# ----------------------------------------------------------------------------- GPU acceptance


def test_gpu_acceptance_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--out", str(tmp_path / "o")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDA GPU" in lines[0], out.stderr
    assert "--device cpu --tiny" in lines[0] and out.stdout == "" and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--tiny"):  # a CPU is for the self-test only
        gpu_acceptance.main(["--device", "cpu", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_gpu_acceptance_self_test_on_tiny_models(tmp_path, monkeypatch):
    """The whole run on the CPU (`--device cpu --tiny`); with a memory tolerance below zero every memory check must
    fail and the run exit with status 1, while the other checks pass. torch.compile runs with the stance
    force_eager here (inductor's C++ build would take most of a minute; compile_token_model against eager is
    tests/test_precision.py's), so the compiled rows check this script's plumbing."""
    monkeypatch.setattr(gpu_acceptance, "MEMORY_TOLERANCE", -1.0)
    with torch.compiler.set_stance("force_eager"):
        status = gpu_acceptance.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    assert status == 1
    result = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    rows = {r["check"]: r for r in result["rows"]}
    memory_rows = [r for name, r in rows.items() if name.startswith("memory estimate")]
    assert len(memory_rows) == 7 and not any(r["ok"] for r in memory_rows)  # 4 AutoNAT host, 3 MaskGIT host
    assert all(r["value"] <= 0.05 for r in memory_rows), memory_rows  # the estimates agree with the real runs
    others = [r for name, r in rows.items() if not name.startswith("memory estimate")]
    assert all(r["ok"] for r in others), [r for r in others if not r["ok"]]
    names = " ".join(rows)
    for part in ("cpu vs cpu, fp32: tokenizer decoded images", "bf16 vs fp32", "fp16 vs fp32", "compiled vs eager",
                 "KA-MIG training: images/s", "steps skipped", "sampling AutoNAT, compiled",
                 "sampling KA-MIG sampler (FusionCache), eager", "tokenizer encode", "tokenizer decode",
                 "cpu vs cpu, fp32: KA-MaskGIT sampler (FusionCache) logits", "fp16 vs fp32 on cpu: MaskGIT logits",
                 "KA-MaskGIT training: images/s", "KA-MaskGIT training: steps skipped", "MaskGIT pretraining: images/s",
                 "sampling KA-MaskGIT sampler (FusionCache), eager: T=4 maskgit"):
        assert part in names, part
    markdown = (tmp_path / "gpu_acceptance.md").read_text()
    assert markdown.startswith("SELF-TEST") and markdown.count("**FAIL**") == 7


ARITHMETIC = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.convolution.", "aten.native_layer_norm.",
              "aten.native_group_norm.", "aten._log_softmax.", "aten.gelu.", "aten.sigmoid.", "aten.mul.", "aten.add.",
              "aten.sub.", "aten.embedding.", "aten._to_copy.", "aten.upsample_nearest2d.", "aten.cat.")


class OpDtypes(TorchDispatchMode):
    """(operator, output dtypes) of the ARITHMETIC operators (views and copies for layout left out), except those
    inside scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside and str(func).startswith(ARITHMETIC):
            flat = out if isinstance(out, (tuple, list)) else [out]
            self.ops.append((str(func), tuple(str(t.dtype) for t in flat if isinstance(t, torch.Tensor))))
        return out


class SkipAttention(TorchFunctionMode):
    """Marks the operators of F.scaled_dot_product_attention (a GPU runs flash attention, a fake CUDA tensor the
    math kernel, a CPU its flash kernel: the estimate's stated difference)."""

    def __init__(self, log: OpDtypes):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.log.inside += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.log.inside -= 1


@contextlib.contextmanager
def autocast_on(device_type: str, dtype):
    """Autocast for `device_type`, switched on even where torch.autocast refuses ('cuda' without a GPU)."""
    was_on, was_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, was_on)
        torch.set_autocast_dtype(device_type, was_dtype)
        torch.clear_autocast_cache()


def training_forward_dtypes(device: str, dtype) -> list:
    """OpDtypes of a tiny KA-MIG training forward + loss and a tokenizer decode on fake tensors of `device`. G_co and
    G_s are off: their GCNs run in fp32 outside autocast, and a sparse product on a fake CUDA tensor asks for a GPU."""
    config = tiny("ka_mig", "fp16")
    config.graph.use_co = config.graph.use_sim = False
    log = OpDtypes()
    policy = memory.CudaAutocastFp32() if device == "cpu" else contextlib.nullcontext()
    with FakeTensorMode(), memory.PeakMemory() as mem, policy:
        place = memory.Place(torch.device(device), mem)
        model = memory.token_network(place, config, "ka_mig").train()
        freeze_for_mode(model, "ka_mig")
        tokenizer = place.module(lambda: VQGAN(tokenizer_config(config.tokenizer)))
        with place.outside():
            real = memory.masked_batch(config, 8, 0)
        b = dataclasses.replace(real, **{f: place.data(v) for f, v in vars(real).items()
                                         if isinstance(v, torch.Tensor)})
        with autocast_on(device, dtype), log, SkipAttention(log):
            masked_token_loss(model(b.input_ids, b.class_ids).float(), b, 0.1)
            tokenizer.decoder(torch.empty(2, config.tokenizer.embed_dim, 4, 4, device=device))
    return log.ops


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_autocast_casts_like_cuda_autocast(dtype):
    """The estimate runs on fake CPU tensors under CPU autocast (with CudaAutocastFp32) for a GPU under CUDA
    autocast: every arithmetic operator of a KA-MIG training forward, its loss and a tokenizer decode must come out
    in the same dtypes, in the same order."""
    cuda, cpu = training_forward_dtypes("cuda", dtype), training_forward_dtypes("cpu", dtype)
    assert cuda == cpu
    low = str(dtype)
    assert ("aten.addmm.default", (low,)) in cpu and ("aten.convolution.default", (low,)) in cpu  # autocast ran
    assert ("aten.native_layer_norm.default", ("torch.float32",) * 3) in cpu


def test_attention_with_dropout_is_estimated_with_the_kernel_a_gpu_runs():
    """A CPU runs attention with dropout (MaskGIT's) through the math kernel, which keeps the [B,h,n,n] probabilities;
    under cuda_code_paths it takes the flash kernel, which saves what CUDA's flash / memory-efficient kernels save."""
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    for policy, kernel in ((contextlib.nullcontext(), "bernoulli_"), (memory.cuda_code_paths(), "flash_attention")):
        with policy, Ops() as ops:
            torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, None, 0.1)
        assert sum(kernel in n for n in ops.names) == 2, ops.names
        assert any("flash_attention" in n for n in ops.names) == (kernel == "flash_attention"), ops.names


def test_maskgit_speed_runs_every_row_interleaved(tmp_path, capsys):
    """benchmarks.maskgit_speed on the tiny KA-MaskGIT: every row timed the asked number of times, the fusion timed
    inside each KA-MaskGIT sampling run (and only there: it is part of the run)."""
    from benchmarks import maskgit_speed
    out, threads = tmp_path / "speed.json", torch.get_num_threads()
    try:
        assert maskgit_speed.main(["--config", "configs/tiny_ka_maskgit.py", "--threads", "1", "--repeats", "2",
                                   "--forward-repeats", "3", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main sets the process's threads
    result = json.loads(out.read_text())
    times = result["times"]
    assert [len(times[r]) for r in result["forward_rows"]] == [3, 3, 3]
    assert [len(times[r]) for r in result["sampling_rows"]] == [2, 2]
    ka_runs = times[result["sampling_rows"][1]]
    assert len(result["fusion"]) == 2 and all(0 < f < t for f, t in zip(result["fusion"], ka_runs))
    assert all(len(result["cpu"][r]) == len(times[r]) for r in times)
    alone = result["isolated"]
    assert alone["depth"] == 3 and 0 < alone["inject"] < min(ka_runs) and alone["class_terms"] > 0
    printed = capsys.readouterr().out
    assert "| KA-MaskGIT sampling, FusionCache (4 steps, batch 2) |" in printed and "load average before" in printed


def test_maskgit_vs_jax_refuses_missing_interpreter_in_one_line(tmp_path, capsys):
    """benchmarks.maskgit_vs_jax (needs a JAX interpreter, never run here): no --jax-python is a flag error (one line,
    status 2); an interpreter that is not there is a MissingInput naming it, raised before any work."""
    from benchmarks import maskgit_vs_jax
    with pytest.raises(SystemExit) as exit_info:
        maskgit_vs_jax.main(["--mirror", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--jax-python" in err, err
    missing = tmp_path / "no_python"
    with pytest.raises(UserError, match="--jax-python .*no_python: no such interpreter"):
        maskgit_vs_jax.main(["--jax-python", str(missing), "--mirror", str(tmp_path)])
