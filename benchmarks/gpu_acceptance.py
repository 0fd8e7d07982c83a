"""GPU acceptance: one command that checks ka-mig on the first GPU it meets and measures it (under 8 minutes).

    python -m benchmarks.gpu_acceptance                          # one CUDA GPU; writes output/gpu_acceptance/
    python -m benchmarks.gpu_acceptance --out DIR                # gpu_acceptance.json and gpu_acceptance.md in DIR
    python -m benchmarks.gpu_acceptance --device cpu --tiny      # SELF-TEST of the checks on a CPU (tiny models)

Checks, with random weights at the real sizes (configs/ka_mig_l.py: the MAGE tokenizer, AutoNAT-L, KA-MIG with
the released G_co / G_s and random G_p), each against a limit:
  - the device against the CPU in fp32 (TF32 off): tokenizer latents and decoded images, AutoNAT-L and KA-MIG logits
    (the model's forward and the sampler's FusionCache), within 1e-4 (relative to the largest reference magnitude
    where that exceeds 1);
  - bf16 and fp16 autocast against fp32 on the device, within the documented 1e-2 and 2e-3
    (docs/reference.md#precision-and-compilation);
  - the compiled token model (libs.sampling.generation.compile_token_model) against eager, fp32, within 1e-4;
  - 20 KA-MIG training steps in fp16 at the paper's 300 images per GPU through libs.training.trainer.Trainer:
    images/s, peak memory, skipped steps (finite losses, at most 10 skips), and 3 AutoNAT-L pretraining steps at 256;
  - sampling throughput (libs.sampling.decoding.generate, T=8 AutoNAT strategy, batch 125 with guidance, bf16) of
    AutoNAT-L and KA-MIG, eager and compiled; tokenizer encode (64 images + flips) and decode (125) throughput;
  - the peak memory that benchmarks.memory estimates for training, pretraining, sampling and tokenizing against
    the peak measured (torch.cuda.max_memory_allocated over the run), within 10%;
  - the second host, MaskGIT (configs/ka_maskgit.py: MaskGIT and KA-MaskGIT, same random backbone weights): device
    against CPU and autocast against fp32 for the logits of MaskGIT, KA-MaskGIT's forward and its FusionCache; 20
    KA-MaskGIT training steps in fp16 at 300 and 3 MaskGIT pretraining steps at 256 (the release's objective);
    sampling throughput (the config's T=16 cosine schedule, batch 125, bf16) of both and the memory estimates of
    the three.
Writes <out>/gpu_acceptance.json and <out>/gpu_acceptance.md (a Markdown table for benchmarks/RESULTS.md) and exits
with status 1 if any check fails. Without a CUDA GPU it refuses in one line (exit status 2).

Self-test (`--device cpu --tiny`): the same checks and measurements with configs/tiny.py models and small batches on
the CPU, where "device against CPU" compares the CPU with itself and memory is counted by benchmarks.memory's
PeakMemory on the real tensors (no rounding; the estimate with a CPU's code paths). It checks this script, not a GPU.
"""
import argparse
import contextlib
import copy
import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import memory
from libs.atomic_io import atomic_write_json, atomic_write_text
from libs.cli import run_main
from libs.config import load_config_file
from libs.data.tokens import encode_images
from libs.errors import UserError
from libs.models.autonat import AutoNAT
from libs.models.factory import backbone_config, for_sampling, graph_config, tokenizer_config
from libs.models.ka_maskgit import KAMaskGIT
from libs.models.ka_mig import KAMIG
from libs.models.maskgit import MaskGIT, maskgit_config
from libs.models.vqgan import VQGAN
from libs.sampling.decoding import generate, schedule_from_config
from libs.sampling.generation import (PRECISIONS, class_labels, compile_token_model, index_generators,
                                      sample_images)
from libs.training.trainer import Trainer, mode_kind

REPO = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = 1e-4     # device vs CPU and compiled vs eager, fp32
AUTOCAST_TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3}  # docs/reference.md#precision-and-compilation
MEMORY_TOLERANCE = 0.10   # |estimated - measured| / measured peak
MAX_SKIPPED = 10          # fp16 loss-scaler skips allowed in the 20 training steps (the scale settles first)


@dataclass
class Sizes:
    """What the run uses: the config of the models and the batches (per GPU) and repeats."""
    config: str
    train_batch: int
    train_steps: int
    pretrain_batch: int
    pretrain_steps: int
    sample_batch: int
    encode_batch: int
    decode_batch: int
    logits_batch: int
    repeats: int
    maskgit_config: str = "configs/ka_maskgit.py"  # the MaskGIT host's models (with its graph block)


REAL = Sizes("configs/ka_mig_l.py", train_batch=300, train_steps=20, pretrain_batch=256, pretrain_steps=3,
             sample_batch=125, encode_batch=64, decode_batch=125, logits_batch=2, repeats=3)
TINY = Sizes("configs/tiny.py", train_batch=16, train_steps=3, pretrain_batch=16, pretrain_steps=2,
             sample_batch=8, encode_batch=4, decode_batch=8, logits_batch=16, repeats=1,  # 16 = 2 x 8: one compile
             maskgit_config="configs/tiny_ka_maskgit.py")


class Report:
    """Rows of the run: each a check (value against a limit) or a measurement (no limit)."""

    def __init__(self, log=print):
        self.rows, self.log = [], log

    def check(self, name: str, value: float, limit: float, unit: str = "", note: str = "") -> bool:
        """Records `value <= limit` (NaN fails)."""
        ok = bool(value <= limit)
        self.rows.append(dict(check=name, value=float(value), limit=float(limit), unit=unit, ok=ok, note=note))
        self.log(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:.3g}) {unit} {note}".rstrip())
        return ok

    def measure(self, name: str, value: float, unit: str, note: str = ""):
        self.rows.append(dict(check=name, value=float(value), limit=None, unit=unit, ok=True, note=note))
        self.log(f"     {name}: {value:.4g} {unit} {note}".rstrip())

    def fail(self, name: str, error: BaseException):
        """A check that raised: recorded as failed with the error."""
        self.rows.append(dict(check=name, value=float("nan"), limit=None, unit="", ok=False,
                              note=f"{type(error).__name__}: {str(error)[:300]}"))
        self.log(f"FAIL {name}: {type(error).__name__}: {error}")

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def markdown(self, header: str) -> str:
        lines = [header, "", "| check | value | limit | unit | result | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            limit = "" if r["limit"] is None else f"{r['limit']:.3g}"
            result = ("ok" if r["ok"] else "**FAIL**") if r["limit"] is not None or not r["ok"] else "measured"
            lines.append(f"| {r['check']} | {r['value']:.4g} | {limit} | {r['unit']} | {result} | {r['note']} |")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- comparisons


def max_difference(value: torch.Tensor, reference: torch.Tensor, relative: bool = False) -> float:
    """max |value - reference| in float64 (divided by max(1, max |reference|) when `relative`); inf on a shape
    mismatch, NaN when either holds NaN."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    if value.shape != reference.shape:
        return float("inf")
    diff = float((value - reference).abs().max()) if value.numel() else 0.0
    if not (torch.isfinite(value).all() and torch.isfinite(reference).all()):
        return float("nan")
    return diff / max(1.0, float(reference.abs().max())) if relative else diff


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and convolutions (fp32 on a GPU as on a CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Best wall seconds of `repeats` calls of fn() after one warm-up call (compilation, autotuning)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device, result: dict):
    """result['peak'] = bytes allocated at the peak of the block, above what was allocated before it: the CUDA
    allocator's figure on a GPU, PeakMemory's count of the real tensors (no rounding) on a CPU."""
    free(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
        result["reserved"] = torch.cuda.max_memory_reserved(device)
    else:
        with memory.PeakMemory(round_to=1, fake=False) as mem:
            yield
        result["peak"] = mem.peak


def estimated_peak(run, config, batch: int, device) -> int:
    """benchmarks.memory's estimate of `run` for `device` (a CPU's rounding and code paths on a CPU)."""
    cuda = device.type == "cuda"
    return memory.estimate(run, config, batch, round_to=memory.ALLOC_ROUND if cuda else 1, cuda_like=cuda).peak


def size_text(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"


def check_memory(report: Report, name: str, estimated: int, measured: dict):
    """Estimate within MEMORY_TOLERANCE of the measured peak."""
    peak = measured["peak"]
    note = f"estimated {size_text(estimated)}, measured {size_text(peak)}"
    if "reserved" in measured:
        note += f" (reserved {size_text(measured['reserved'])})"
    report.check(f"memory estimate vs measured peak: {name}", abs(estimated - peak) / max(peak, 1), MEMORY_TOLERANCE,
                 "relative", note)


# ----------------------------------------------------------------------------- models


def load(sizes: Sizes, backbone: str = "autonat"):
    """The config of the AutoNAT host's models (sizes.config) or the MaskGIT host's (sizes.maskgit_config)."""
    return load_config_file(REPO / (sizes.maskgit_config if backbone == "maskgit" else sizes.config))


def build_models(config, kinds=("tokenizer", "autonat", "ka_mig"), seed: int = 0) -> dict:
    """CPU models with seeded random weights: 'tokenizer', 'autonat', and 'ka_mig' (the same backbone weights as
    'autonat': same seed, same initialisation order; non-zero graph modules and a random G_p, so every graph term
    counts); likewise 'maskgit' and 'ka_maskgit' for a MaskGIT config."""
    models = {}
    if "tokenizer" in kinds:
        torch.manual_seed(seed)
        models["tokenizer"] = VQGAN(tokenizer_config(config.tokenizer))
    if "autonat" in kinds:
        torch.manual_seed(seed + 1)
        models["autonat"] = AutoNAT(backbone_config(config.model))
    if "ka_mig" in kinds:
        models["ka_mig"] = with_random_graphs(KAMIG, backbone_config(config.model), config, seed)
    if "maskgit" in kinds:
        torch.manual_seed(seed + 1)
        models["maskgit"] = MaskGIT(maskgit_config(config.model))
    if "ka_maskgit" in kinds:
        models["ka_maskgit"] = with_random_graphs(KAMaskGIT, maskgit_config(config.model), config, seed)
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}


def with_random_graphs(host, sizes, config, seed: int):
    """host(sizes) with the graphs of memory.graphs_for (a random G_p) and N(0, 0.02) graph modules; its backbone
    weights are those of the bare backbone built after torch.manual_seed(seed + 1)."""
    g = torch.Generator().manual_seed(seed + 2)
    graphs = memory.graphs_for(config, "cpu")
    if "incompat" in graphs:
        graphs["incompat"] = torch.randint(0, 256, graphs["incompat"].shape, generator=g, dtype=torch.uint8)
    torch.manual_seed(seed + 1)
    model = host(sizes, graph_config(config.graph), graphs)
    with torch.no_grad():
        for p in model.graph_layer.parameters():
            p.normal_(0, 0.02, generator=g)
    return model


def token_inputs(config, batch: int, seed: int = 0, mask_token_id: int = None):
    """Ids [B,L] with about half the places [MASK] (default K, AutoNAT's id), and class ids [B] including the
    null class."""
    m = config.model
    mask = m.codebook_size if mask_token_id is None else mask_token_id
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.codebook_size, (batch, m.seq_len), generator=g)
    ids = torch.where(torch.rand(batch, m.seq_len, generator=g) < 0.5, torch.full_like(ids, mask), ids)
    cls = torch.arange(batch) % (m.num_classes + 1)
    return ids, cls


def token_calls(models: dict) -> dict:
    """{name: callable (ids, cls) -> logits} of the token models: AutoNAT, KA-MIG's forward, KA-MIG's FusionCache."""
    return {"AutoNAT": models["autonat"], "KA-MIG forward": models["ka_mig"],
            "KA-MIG sampler (FusionCache)": for_sampling(models["ka_mig"])}


def maskgit_calls(models: dict) -> dict:
    """token_calls of the MaskGIT host: MaskGIT, KA-MaskGIT's forward, KA-MaskGIT's FusionCache."""
    return {"MaskGIT": models["maskgit"], "KA-MaskGIT forward": models["ka_maskgit"],
            "KA-MaskGIT sampler (FusionCache)": for_sampling(models["ka_maskgit"])}


def to_device(models: dict, device) -> dict:
    """Copies of the models on `device` (the CPU originals stay as they are)."""
    return {k: copy.deepcopy(m).to(device) for k, m in models.items()}


# ----------------------------------------------------------------------------- checks


@torch.no_grad()
def check_device_vs_cpu(report: Report, models: dict, dev_models: dict, config, sizes: Sizes, device):
    """fp32 outputs on the device against the CPU: tokenizer latents and images, token model logits."""
    ids, cls = token_inputs(config, sizes.logits_batch)
    images = torch.rand(sizes.logits_batch, 3, config.tokenizer.resolution, config.tokenizer.resolution,
                        generator=torch.Generator().manual_seed(1))
    codes = ids.clamp(max=config.model.codebook_size - 1)
    with exact_fp32():
        pairs = {"tokenizer encoder latents": lambda m, d: m["tokenizer"].encoder(images.to(d)),
                 "tokenizer decoded images": lambda m, d: m["tokenizer"].decode(codes.to(d))}
        for name in token_calls(models):
            pairs[f"{name} logits"] = lambda m, d, n=name: token_calls(m)[n](ids.to(d), cls.to(d))
        for name, fn in pairs.items():
            difference = max_difference(fn(dev_models, device), fn(models, "cpu"), relative=True)
            report.check(f"{device.type} vs cpu, fp32: {name}", difference, FP32_TOLERANCE)


@torch.no_grad()
def check_autocast(report: Report, dev_models: dict, config, sizes: Sizes, device):
    """bf16 / fp16 autocast logits against fp32 on the device."""
    ids, cls = (t.to(device) for t in token_inputs(config, sizes.logits_batch))
    for name, model in token_calls(dev_models).items():
        with exact_fp32():
            ref = model(ids, cls).float()
        for precision, limit in AUTOCAST_TOLERANCE.items():
            with torch.autocast(device.type, dtype=PRECISIONS[precision]):
                low = model(ids, cls)
            report.check(f"{precision} vs fp32 on {device.type}: {name} logits", max_difference(low, ref), limit,
                         note=f"largest |logit| {float(ref.abs().max()):.3g}")


@torch.no_grad()
def check_compiled(report: Report, dev_models: dict, config, sizes: Sizes, device):
    """compile_token_model against eager, fp32, for AutoNAT and KA-MIG's sampler (compiles them in place)."""
    ids, cls = (t.to(device) for t in token_inputs(config, sizes.logits_batch))
    for name in ("AutoNAT", "KA-MIG sampler (FusionCache)"):
        model = token_calls(dev_models)[name]
        with exact_fp32():
            eager = model(ids, cls)
            compile_token_model(model)
            compiled = model(ids, cls)
        report.check(f"compiled vs eager, fp32: {name} logits", max_difference(compiled, eager), FP32_TOLERANCE)


def training_config(config, mode: str, batch: int, steps: int, out_dir):
    """`config`, changed in place, for `steps` steps of `mode` at `batch` per process in fp16, run folder in
    `out_dir` (no checkpoint written within the steps)."""
    t = config.train
    t.mode, t.batch_size, t.n_steps, t.grad_accum = mode, batch, steps, 1
    t.mixed_precision, t.save_interval, t.log_interval = "fp16", 10 ** 9, 10 ** 9
    t.init_checkpoint = ""
    config.output_dir, config.run_name = str(out_dir), f"gpu_acceptance_{mode}"
    return config


def training_name(sizes: Sizes, mode: str, backbone: str) -> str:
    if backbone == "maskgit":
        return "KA-MaskGIT training" if mode == "ka_mig" else "MaskGIT pretraining"
    return "KA-MIG training" if mode == "ka_mig" else "AutoNAT-L pretraining" if sizes is REAL else "pretraining"


def check_training(report: Report, sizes: Sizes, device, mode: str, batch: int, steps: int, backbone="autonat"):
    """`steps` Trainer steps of `mode` (fp16) at `batch` on the AutoNAT or MaskGIT host (`backbone`; the config's
    objective): images/s, skipped steps, finite losses, peak memory against benchmarks.memory's estimate."""
    name = training_name(sizes, mode, backbone)
    with tempfile.TemporaryDirectory() as out:
        config = training_config(load(sizes, backbone), mode, batch, steps, out)
        m = config.model
        g = np.random.default_rng(0)
        tokens = g.integers(0, m.codebook_size, (batch * steps, m.seq_len)).astype(np.uint16)
        labels = np.arange(batch * steps) % m.num_classes
        measured, losses, times = {}, [], []
        with peak_memory(device, measured):
            kind = mode_kind(config)  # 'ka_mig' / 'autonat', 'ka_maskgit' / 'maskgit'
            model = build_models(config, (kind,))[kind].requires_grad_(True).train()
            trainer = Trainer(config, tokens, labels, model=model)
            for _ in range(steps):
                synchronize(device)
                t0 = time.perf_counter()
                losses.append(trainer.train_step()["loss"])
                synchronize(device)
                times.append(time.perf_counter() - t0)
            skipped = trainer.skipped_total
            if hasattr(trainer, "close"):
                trainer.close()  # the run folder's lock
            del trainer, model
        steady = times[1:] or times
        report.measure(f"{name}: images/s (fp16, batch {batch}, steps 2-{steps})", batch * len(steady) / sum(steady),
                       "images/s")
        report.check(f"{name}: non-finite losses", sum(not np.isfinite(x) for x in losses), 0)
        if mode == "ka_mig":
            report.check(f"{name}: steps skipped by the fp16 loss scaler", skipped, min(MAX_SKIPPED, steps - 1),
                         "steps", f"of {steps}")
        estimate_config = training_config(load(sizes, backbone), mode, batch, 1, out)
        check_memory(report, f"{name}, batch {batch}", estimated_peak(memory.training, estimate_config, batch, device),
                     measured)
    free(device)


@torch.no_grad()
def check_sampling(report: Report, dev_models: dict, config, sizes: Sizes, device, compiled: bool):
    """images/s of generate (T=8 strategy, guidance, bf16) for AutoNAT and KA-MIG; eager also measures the peak
    memory of sample_images with KA-MIG (+ decode) against the estimate."""
    schedule = schedule_from_config(config.sample)
    B = sizes.sample_batch
    cls = torch.from_numpy(class_labels(B, config.model.num_classes)).long().to(device)
    for name in ("AutoNAT", "KA-MIG sampler (FusionCache)"):
        model = token_calls(dev_models)[name]
        if compiled and getattr(getattr(model, "model", model).mlm_layer, "_compiled_call_impl", None) is None:
            compile_token_model(model)  # (check_compiled compiled them already in run_all)

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                generate(model, cls, schedule, seq_len=config.model.seq_len, mask_token_id=config.model.codebook_size,
                         null_class_id=config.model.num_classes, generator=index_generators(range(B), 0, device))
        seconds = timed(run, device, sizes.repeats)
        report.measure(f"sampling {name}, {'compiled' if compiled else 'eager'}: T={schedule.steps}, batch {B}, bf16",
                       B / seconds, "images/s", f"{seconds:.2f} s per batch")
    if compiled:
        return
    measured = {}
    with peak_memory(device, measured):
        models = build_models(config, ("tokenizer", "ka_mig"))
        ka_mig = for_sampling(models["ka_mig"].to(device))
        tokenizer = models["tokenizer"].to(device)
        sample_images(ka_mig, tokenizer, cls, schedule, index_generators(range(B), 0, device), "bf16",
                      config.sample.get("pixels", "truncate"))
        del models, ka_mig, tokenizer
    check_memory(report, f"KA-MIG sampling + decode, batch {B}, bf16",
                 estimated_peak(memory.WORKLOADS["sample_bf16"].run, config, B, device), measured)


@torch.no_grad()
def check_tokenizer(report: Report, dev_models: dict, config, sizes: Sizes, device):
    """Encode (images + flips) and decode throughput, and the encode's peak memory against the estimate."""
    tokenizer, R = dev_models["tokenizer"], config.tokenizer.resolution
    images = torch.randint(0, 256, (sizes.encode_batch, 3, R, R), dtype=torch.uint8)
    seconds = timed(lambda: encode_images(tokenizer, images, True, device), device, sizes.repeats)
    report.measure(f"tokenizer encode, batch {sizes.encode_batch} + flips, fp32", 2 * sizes.encode_batch / seconds,
                   "images/s")
    ids = torch.randint(0, config.tokenizer.codebook_size, (sizes.decode_batch, tokenizer.grid_size ** 2),
                        device=device)
    seconds = timed(lambda: tokenizer.decode(ids), device, sizes.repeats)
    report.measure(f"tokenizer decode, batch {sizes.decode_batch}, fp32", sizes.decode_batch / seconds, "images/s")
    del ids
    measured = {}
    with peak_memory(device, measured):
        tok = build_models(config, ("tokenizer",))["tokenizer"].to(device)
        encode_images(tok, torch.zeros(sizes.encode_batch, 3, R, R, dtype=torch.uint8), True, device)
        del tok
    check_memory(report, f"tokenizer encode, batch {sizes.encode_batch} + flips",
                 estimated_peak(memory.tokenizing, config, sizes.encode_batch, device), measured)


@torch.no_grad()
def check_maskgit(report: Report, sizes: Sizes, device):
    """The MaskGIT host (sizes.maskgit_config): logits of MaskGIT, KA-MaskGIT's forward and its FusionCache on
    the device against the CPU (fp32) and under bf16 / fp16 autocast against fp32; sampling images/s (the config's
    schedule, bf16) of MaskGIT and KA-MaskGIT, and the peak memory of KA-MaskGIT's sample_images against the
    estimate."""
    config = load(sizes, "maskgit")
    models = build_models(config, ("maskgit", "ka_maskgit"))
    dev_models = to_device(models, device)
    mask_id = models["maskgit"].mask_token_id
    ids, cls = token_inputs(config, sizes.logits_batch, mask_token_id=mask_id)
    for name in maskgit_calls(models):
        with exact_fp32():
            ref = maskgit_calls(dev_models)[name](ids.to(device), cls.to(device)).float()
            cpu = maskgit_calls(models)[name](ids, cls)
        report.check(f"{device.type} vs cpu, fp32: {name} logits", max_difference(ref, cpu, relative=True),
                     FP32_TOLERANCE)
        for precision, limit in AUTOCAST_TOLERANCE.items():
            with torch.autocast(device.type, dtype=PRECISIONS[precision]):
                low = maskgit_calls(dev_models)[name](ids.to(device), cls.to(device))
            report.check(f"{precision} vs fp32 on {device.type}: {name} logits", max_difference(low, ref), limit,
                         note=f"largest |logit| {float(ref.abs().max()):.3g}")
    schedule, B = schedule_from_config(config.sample), sizes.sample_batch
    labels = torch.from_numpy(class_labels(B, config.model.num_classes)).long().to(device)
    for name in ("MaskGIT", "KA-MaskGIT sampler (FusionCache)"):
        model = maskgit_calls(dev_models)[name]

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                generate(model, labels, schedule, seq_len=config.model.seq_len, mask_token_id=mask_id,
                         null_class_id=config.model.num_classes, generator=index_generators(range(B), 0, device))
        seconds = timed(run, device, sizes.repeats)
        report.measure(f"sampling {name}, eager: T={schedule.steps} {config.sample.schedule}, batch {B}, bf16",
                       B / seconds, "images/s", f"{seconds:.2f} s per batch")
    del dev_models
    free(device)
    measured = {}
    with peak_memory(device, measured):
        built = build_models(config, ("tokenizer", "ka_maskgit"))
        sampler = for_sampling(built["ka_maskgit"].to(device))
        sample_images(sampler, built["tokenizer"].to(device), labels, schedule,
                      index_generators(range(B), 0, device), "bf16", config.sample.get("pixels", "truncate"))
        del built, sampler
    check_memory(report, f"KA-MaskGIT sampling + decode, batch {B}, bf16",
                 estimated_peak(lambda p, c, b: memory.sampling(p, c, b, "bf16"), config, B, device), measured)


# ----------------------------------------------------------------------------- main


def run_all(device: torch.device, sizes: Sizes, log=print) -> Report:
    """Every check and measurement, each recorded (a check that raises is recorded as failed)."""
    report = Report(log)
    config = load(sizes)
    models = build_models(config)
    steps = [
        ("KA-MIG training", lambda: check_training(report, sizes, device, "ka_mig", sizes.train_batch,
                                                   sizes.train_steps)),
        ("pretraining", lambda: check_training(report, sizes, device, "pretrain", sizes.pretrain_batch,
                                               sizes.pretrain_steps)),
        ("KA-MaskGIT training", lambda: check_training(report, sizes, device, "ka_mig", sizes.train_batch,
                                                       sizes.train_steps, "maskgit")),
        ("MaskGIT pretraining", lambda: check_training(report, sizes, device, "pretrain", sizes.pretrain_batch,
                                                       sizes.pretrain_steps, "maskgit")),
        ("MaskGIT host", lambda: check_maskgit(report, sizes, device)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            report.fail(name, e)
        free(device)
    dev_models = to_device(models, device)
    for name, step in [
        ("device vs cpu", lambda: check_device_vs_cpu(report, models, dev_models, config, sizes, device)),
        ("autocast", lambda: check_autocast(report, dev_models, config, sizes, device)),
        ("tokenizer", lambda: check_tokenizer(report, dev_models, config, sizes, device)),
        ("sampling, eager", lambda: check_sampling(report, dev_models, config, sizes, device, compiled=False)),
        ("compiled vs eager", lambda: check_compiled(report, dev_models, config, sizes, device)),
        ("sampling, compiled", lambda: check_sampling(report, dev_models, config, sizes, device, compiled=True)),
    ]:
        try:
            step()
        except Exception as e:  # noqa: BLE001
            report.fail(name, e)
        free(device)
    return report


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2 ** 30:.1f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU self-test (tiny models), torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --tiny")
    parser.add_argument("--tiny", action="store_true", help="self-test: tiny models and batches (with --device cpu)")
    parser.add_argument("--out", default="output/gpu_acceptance", help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("benchmarks.gpu_acceptance needs a CUDA GPU and this machine has none "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                        "`--device cpu --tiny` runs its self-test on a CPU")
    if device.type != "cuda" and not args.tiny:
        raise UserError(f"--device {args.device} is only for the self-test: add --tiny (the acceptance run is for a "
                        "CUDA GPU)")
    sizes = TINY if args.tiny else REAL
    torch.manual_seed(0)
    t0 = time.perf_counter()
    report = run_all(device, sizes)
    seconds = time.perf_counter() - t0
    header = (f"{'SELF-TEST, ' if args.tiny else ''}{describe(device)}; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"{seconds:.0f} s; {sum(not r['ok'] for r in report.rows)} failed of {len(report.rows)}")
    out = Path(args.out)
    atomic_write_json(out / "gpu_acceptance.json", {"device": describe(device), "tiny": args.tiny,
                                                    "seconds": seconds, "ok": report.ok, "rows": report.rows})
    atomic_write_text(out / "gpu_acceptance.md", report.markdown(header))
    print(f"\n{header}\nwrote {out / 'gpu_acceptance.json'} and {out / 'gpu_acceptance.md'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_main(main)
