"""Sampling and training cost of KA-MIG vs the bare AutoNAT backbone, AutoNAT-L sizes.

    python -m benchmarks.sampling                    # CPU, 2 threads, batch 4, T=8, guidance
    python -m benchmarks.sampling --device cuda --batch 125 --precision bf16 --compile
Prints the sampling table (every run, paired ratios, the time spent inside the cached fusion, and the
GEMM-rate floor of the backbone), then the training-step table on CPU. Weights are random (same backbone
weights in both models, non-zero fusion convs), so the figures are costs, not image quality. Graphs:
the released G_co / G_s, random G_p for 1000 classes. On CPU an extra row runs the backbone with plain
F.linear (MKL) instead of the default oneDNN linears.
"""
import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from configs import autonat_t8_strategy
from libs.checkpoint import load_strict
from libs.config import load_config_file
from libs.devices import check_device
from libs.errors import BadInput
from libs.graphs.files import graph_paths, load_edge_graph
from libs.models.factory import build_model
from libs.models.cpu_kernels import apply_cpu_kernels
from libs.models.fusion_cache import FusionCache
from libs.sampling.decoding import generate, schedule_from_config
from libs.training.objective import make_masked_batch, masked_token_loss
from libs.training.trainer import freeze_for_mode
from tests.helpers import reference_forward

REPO = Path(__file__).resolve().parents[1]


def build(kind, device, seed=0):
    """AutoNAT-L ('autonat') or KA-MIG on the same random backbone ('ka_mig'), from configs/ka_mig_l.py."""
    config = load_config_file("configs/ka_mig_l.py")
    torch.manual_seed(seed)
    backbone = build_model(config, "autonat")
    if kind == "autonat":
        return backbone.eval().to(device)
    released = graph_paths(REPO / "tests" / "compat" / "official_graph_prior")  # the released G_co / G_s
    g = torch.Generator().manual_seed(1)
    graphs = dict(co=load_edge_graph(released["co"]), sim=load_edge_graph(released["sim"]),
                  incompat=torch.randint(0, 256, (1000, 256, 128), generator=g, dtype=torch.uint8))
    model = build_model(config, "ka_mig", graphs)
    load_strict(model, backbone.state_dict(), allow_missing=("graph_layer.",))
    with torch.no_grad():
        for p in model.graph_layer.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval().to(device)


def matmul_flops(cfg, rows: int, steps: int) -> float:
    """Multiply-add FLOPs of the backbone's matmuls and attention over one sampling run of `rows` sequences."""
    n, d, blocks = cfg.seq_len + 1, cfg.embed_dim, cfg.depth + 1
    hidden = int(d * cfg.mlp_ratio)
    per_block = 2 * rows * n * d * (4 * d + 2 * hidden) + 4 * rows * n * n * d  # qkv+proj+mlp, QK^T and AV
    skips = cfg.depth // 2 * 2 * rows * n * 2 * d * d  # skip_linear of the out-blocks
    head = 2 * rows * n * d * (d + cfg.codebook_size + 1)
    return steps * (blocks * per_block + skips + head)


def sgemm_rate(rows: int, cfg, repeats=20) -> float:
    """Best FLOP/s of this machine's fp32 GEMM (F.linear, MKL) at the shape of the backbone's MLP (fc1)."""
    x = torch.randn(rows * (cfg.seq_len + 1), cfg.embed_dim)
    w = torch.randn(int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim)
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):  # warm-up
            torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t0)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / best


def time_sampling(args):
    """Seconds per sampling batch of each model and repeat, runs interleaved in one process."""
    device = torch.device(args.device)
    kernels = "onednn" if device.type == "cpu" else "default"  # the sampling scripts' default
    bare = build("autonat", device)
    ka_mig = apply_cpu_kernels(build("ka_mig", device), kernels)
    schedule = schedule_from_config(autonat_t8_strategy.get_config())
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    cls = torch.arange(args.batch, device=device) % 1000
    fusion = [0.0]  # seconds spent in the cached path's fusion (per-batch class terms + every inject call)

    def timed(fn):  # fn(...) timed into fusion[0]; a returned inject(j, h) is timed call by call too
        def wrapper(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            fusion[0] += time.perf_counter() - t0
            if not callable(out):
                return out

            def timed_inject(j, h):
                t = time.perf_counter()
                y = out(j, h)
                fusion[0] += time.perf_counter() - t
                return y
            return timed_inject
        return wrapper

    t0 = time.perf_counter()
    cache = FusionCache(ka_mig)  # once per set of weights (checkpoint load), not per sampling batch
    tables_s = time.perf_counter() - t0
    if not args.compile and device.type == "cpu":  # on CUDA the times would be launch times, not work
        cache.terms_for = timed(cache.terms_for)  # instance attributes: FusionCache calls these
        ka_mig.fused_injection = timed(ka_mig.fused_injection)
    runs = {"autonat": apply_cpu_kernels(copy.deepcopy(bare), kernels), "ka_mig": cache, "ka_mig_uncached": ka_mig}
    if device.type == "cpu":
        runs["autonat_mkl"] = bare  # the backbone with the default F.linear (MKL) GEMMs
    compiled = {}

    def run(kind, seed):
        model = runs[kind]
        if args.compile and kind not in compiled:
            compiled[kind] = torch.compile(model)
        forward = compiled.get(kind, model)
        g = torch.Generator(device=device).manual_seed(seed)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx:
            generate(forward, cls, schedule, seq_len=256, mask_token_id=1024, null_class_id=1000, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for w in range(args.warmup):
        for kind in runs:
            run(kind, 100 + w)
    times = {kind: [] for kind in runs}
    times.update(fusion=[], tables=tables_s, sgemm=[], flops=matmul_flops(bare.cfg, 2 * args.batch, schedule.steps))
    for r in range(args.repeats):
        if device.type == "cpu":
            times["sgemm"].append(sgemm_rate(2 * args.batch, bare.cfg))
        for kind in runs:  # interleaved, so a change in machine load hits every model alike
            fusion[0] = 0.0
            times[kind].append(run(kind, r))
            if kind == "ka_mig":
                times["fusion"].append(fusion[0])
    return times


def train_step_cost(mode, args):
    """Seconds per step and peak RSS of one process doing `mode` steps (AutoNAT-L sizes, small batch)."""
    model = build("autonat" if mode == "pretrain" else "ka_mig", "cpu").train()
    forward = model
    if mode == "ka_mig_per_token":  # the paper's arithmetic: both positive convs on every token (the test oracle)
        forward = lambda ids, cls: reference_forward(model, ids, cls)  # noqa: E731
    freeze_for_mode(model, "pretrain" if mode == "pretrain" else "ka_mig")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.train_steps):
        ids = torch.randint(0, 1024, (args.train_batch, 256), generator=g)
        batch = make_masked_batch(ids, torch.randint(0, 1000, (args.train_batch,), generator=g), 1024, 1000,
                                  generator=g)
        t0 = time.perf_counter()
        loss = masked_token_loss(forward(batch.input_ids, batch.class_ids), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_trained = sum(p.numel() for p in params)
    n_state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return min(times[1:] or times), peak_gb, n_trained, n_state


def child(args):
    """Runs one measurement in this process and prints its result line."""
    torch.set_num_threads(args.threads)
    if args.measure == "sample":
        print("RESULT", json.dumps(time_sampling(args)))
    else:
        print("RESULT", json.dumps(train_step_cost(args.measure.split(":")[1], args)))


def measure(args, what):
    cmd = [sys.executable, "-m", "benchmarks.sampling", "--measure", what] + [a for a in sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if out.returncode or not lines:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def print_sampling(t, args):
    """Prints the sampling table and the figures behind it."""
    names = {"autonat": "AutoNAT-L backbone", "ka_mig": "KA-MIG, cached fast path",
             "ka_mig_uncached": "KA-MIG, recomputing graphs every forward",
             "autonat_mkl": "AutoNAT-L backbone, default MKL linears (--cpu-kernels default)"}
    bare = min(t["autonat"])
    print(f"\n| sampling ({args.batch} images) | seconds (min) | images/s | vs backbone | every run, s |"
          f"\n|---|---|---|---|---|")
    for kind, name in names.items():
        if kind not in t:
            continue
        s = min(t[kind])
        print(f"| {name} | {s:.2f} | {args.batch / s:.3f} | {100 * (s / bare - 1):+.1f}% | "
              f"{' '.join(f'{x:.1f}' for x in t[kind])} |")
    ratios = [k / b for k, b in zip(t["ka_mig"], t["autonat"])]  # run i of each model ran back to back
    print(f"\ncached KA-MIG / backbone, paired by repeat: {' '.join(f'{100 * (x - 1):+.1f}%' for x in ratios)}")
    if t["fusion"] and any(t["fusion"]):  # timed inside the cached runs: the fusion's own cost
        print("time inside the cached fusion (class terms + 25 table lookups per forward), per cached run: "
              + " ".join(f"{f:.2f} s ({100 * f / k:.2f}%)" for f, k in zip(t["fusion"], t["ka_mig"])))
    print(f"token tables (GCNs + 25 folded convs), built once per set of weights before timing: {t['tables']:.2f} s")
    if t["sgemm"]:
        rate = max(t["sgemm"])
        print(f"backbone matmuls + attention: {t['flops'] / 1e12:.2f} TFLOP per sampling run; this machine's fp32 "
              f"GEMM at the fc1 shape: {' '.join(f'{x / 1e9:.0f}' for x in t['sgemm'])} GFLOP/s (one per repeat), "
              f"that is {t['flops'] / rate:.1f} s of pure GEMM at the best rate, whatever the implementation")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        check_device(args.device)
    except BadInput as e:
        parser.error(str(e))
    if args.measure:
        return child(args)

    print(f"device {args.device}, {args.threads} threads, batch {args.batch} (x2 with guidance), T=8, "
          f"{args.precision}{', torch.compile' if args.compile else ''}; sampling runs interleaved in one "
          f"process, min of {args.repeats}; training rows each in their own process")
    t = measure(args, "sample")
    print_sampling(t, args)
    packed_mb = 1000 * 256 * 128 / 2 ** 20
    dense_mb = 1000 * 256 * 1024 * 4 / 2 ** 20
    print(f"\nincompatibility prior for 1000 classes on device: {packed_mb:.1f} MiB packed bits "
          f"(dense float32 [1000,256,1024]: {dense_mb:.0f} MiB)")
    if args.skip_train or args.device != "cpu":
        return
    print(f"\n| training step (CPU, batch {args.train_batch}) | s/step | peak RSS GiB | trained params | "
          f"optimizer state values |\n|---|---|---|---|---|")
    for mode in ("pretrain", "ka_mig", "ka_mig_per_token"):
        s, peak, n, state = measure(args, f"train:{mode}")
        print(f"| {mode} | {s:.2f} | {peak:.2f} | {int(n):,} | {int(state):,} |")


if __name__ == "__main__":
    main()
