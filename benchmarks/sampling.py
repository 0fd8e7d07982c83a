"""Sampling and training cost of KA-MIG vs the bare AutoNAT backbone, AutoNAT-L sizes (issue 7).

    python benchmarks/sampling.py                    # CPU, 2 threads, batch 4, T=8, guidance
    python benchmarks/sampling.py --device cuda --batch 125 --precision bf16 --compile
Prints one table. Weights are random (same backbone weights in both models, non-zero fusion convs), so
the figures are costs, not image quality. Graphs: the released G_co / G_s, random G_p for 1000 classes.
"""
import argparse
import contextlib
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(kind, device, seed=0):
    import torch
    from libs.autonat import AutoNAT
    from libs.ka_mig import KAMIG
    torch.manual_seed(seed)
    backbone = AutoNAT()
    if kind == "autonat":
        return backbone.eval().to(device)
    from libs.graph_io import load_edge_graph
    graphs_dir = REPO / "tests" / "compat" / "official_graph_prior"
    g = torch.Generator().manual_seed(1)
    graphs = dict(co=load_edge_graph(graphs_dir / "codebook_co_occurrence_norm_self_50.pkl"),
                  sim=load_edge_graph(graphs_dir / "codebook_replace_graph_norm_self.pkl"),
                  incompat=torch.randint(0, 256, (1000, 256, 128), generator=g, dtype=torch.uint8))
    model = KAMIG(backbone.cfg, graphs=graphs)
    model.load_state_dict(backbone.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.graph_layer.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval().to(device)


def time_sampling(args):
    """Seconds per sampling batch of each model, runs interleaved in one process (min over repeats)."""
    import torch
    from configs import autonat_t8_strategy
    from libs.nat import generate, schedule_from_config
    device = torch.device(args.device)
    bare = build("autonat", device)
    ka_mig = build("ka_mig", device)
    schedule = schedule_from_config(autonat_t8_strategy.get_config())
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    cls = torch.arange(args.batch, device=device) % 1000
    runs = {"autonat": (bare, True), "ka_mig": (ka_mig, True), "ka_mig_uncached": (ka_mig, False)}
    compiled = {}

    def run(kind, seed):
        model, cached = runs[kind]
        model.use_inference_cache = cached
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
    for r in range(args.repeats):
        for kind in runs:  # interleaved, so a change in machine load hits every model alike
            times[kind].append(run(kind, r))
    return {kind: min(v) for kind, v in times.items()}


def train_step_cost(mode, args):
    """Seconds per step and peak RSS of one process doing `mode` steps (AutoNAT-L sizes, small batch)."""
    import torch
    from libs.nat import make_masked_batch, masked_token_loss
    from libs.train import freeze_for_mode
    model = build("ka_mig" if mode == "ka_mig" else "autonat", "cpu").train()
    freeze_for_mode(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.train_steps):
        ids = torch.randint(0, 1024, (args.train_batch, 256), generator=g)
        batch = make_masked_batch(ids, torch.randint(0, 1000, (args.train_batch,), generator=g), 1024, 1000,
                                  generator=g)
        t0 = time.perf_counter()
        loss = masked_token_loss(model(batch.input_ids, batch.class_ids), batch)
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
    import torch
    torch.set_num_threads(args.threads)
    if args.measure == "sample":
        t = time_sampling(args)
        print("RESULT", t["autonat"], t["ka_mig"], t["ka_mig_uncached"])
    else:
        print("RESULT", *train_step_cost(args.measure.split(":")[1], args))


def measure(args, what):
    cmd = [sys.executable, __file__, "--measure", what] + [a for a in sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    if out.returncode or not lines:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return [float(x) for x in lines[-1].split()[1:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return child(args)

    print(f"device {args.device}, {args.threads} threads, batch {args.batch} (x2 with guidance), T=8, "
          f"{args.precision}{', torch.compile' if args.compile else ''}; sampling runs interleaved in one "
          f"process, min of {args.repeats}; training rows each in their own process")
    bare, fast, slow = measure(args, "sample")
    rows = [("AutoNAT-L backbone", bare), ("KA-MIG, cached fast path", fast),
            ("KA-MIG, recomputing graphs every forward", slow)]
    print(f"\n| sampling ({args.batch} images) | seconds | images/s | vs backbone |\n|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {args.batch / s:.3f} | {100 * (s / bare - 1):+.1f}% |")
    packed_mb = 1000 * 256 * 128 / 2 ** 20
    dense_mb = 1000 * 256 * 1024 * 4 / 2 ** 20
    print(f"\nincompatibility prior for 1000 classes on device: {packed_mb:.1f} MiB packed bits "
          f"(dense float32 [1000,256,1024]: {dense_mb:.0f} MiB)")
    if args.skip_train or args.device != "cpu":
        return
    print(f"\n| training step (CPU, batch {args.train_batch}) | s/step | peak RSS GiB | trained params | "
          f"optimizer state values |\n|---|---|---|---|---|")
    for mode in ("pretrain", "ka_mig"):
        s, peak, n, state = measure(args, f"train:{mode}")
        print(f"| {mode} | {s:.2f} | {peak:.2f} | {int(n):,} | {int(state):,} |")


if __name__ == "__main__":
    main()
