"""Forward and sampling time of KA-MaskGIT over the bare MaskGIT at the real sizes (configs/ka_maskgit.py), on a CPU.

    python -m benchmarks.maskgit_speed                       # 2 threads, batch 2, 16-step release sampler
    python -m benchmarks.maskgit_speed --batch 4 --repeats 3 --json out.json
    python -m benchmarks.maskgit_speed --config configs/tiny_ka_maskgit.py   # smoke test (tests/test_benchmark_tools)

Random weights (benchmarks.gpu_acceptance.build_models: the same MaskGIT weights in both models, graph modules
N(0, 0.02), the released G_co / G_s and a random G_p for 1000 classes), so the figures are costs, not image quality.
Rows, all runs of all rows interleaved in one process (run i of every row back to back, so load changes hit them
alike):
  - forward: logits [B,256,1024] of ids with half the places [MASK]: MaskGIT; KA-MaskGIT through its FusionCache
    (what the samplers call); KA-MaskGIT's own forward (graph encoders and fusion computed in the call, as training
    does, here without gradients);
  - sampling: libs.sampling.maskgit_decode.decode (the release's sampler: 16 steps, cosine schedule, choice
    temperature 4.5, one forward of B rows per step) of MaskGIT and of KA-MaskGIT through FusionCache, and the
    time spent inside KA-MaskGIT's fusion during those runs (class terms once per run + one injection per layer
    and step), timed directly: the figure that load on the machine disturbs least.
Ratios: of the minimum over runs, and paired by run (each run against the MaskGIT run next to it), in wall time
and in this process's CPU time (less disturbed by other work on the machine: waiting for a core is not counted).
Last, the fusion alone (one injection, the class terms of a batch, timed in a loop) and what it adds to a sampling
run. The load average before and after is printed: other work on the machine inflates single runs.
"""
import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.gpu_acceptance import build_models, token_inputs
from libs.atomic_io import atomic_write_json
from libs.config import load_config_file
from libs.models.fusion_cache import FusionCache
from libs.sampling.maskgit_decode import decode

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ka_maskgit.py"


class FusionTimer:
    """Seconds spent in a FusionCache's class terms and its model's injections (wraps them on the instances)."""

    def __init__(self, cache: FusionCache):
        self.seconds = 0.0
        cache.terms_for = self.timed(cache.terms_for)
        cache.model.fused_injection = self.timed(cache.model.fused_injection)

    def timed(self, fn):
        """fn timed into self.seconds; a callable it returns (an injection) is timed call by call too."""
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - t0
            return self.timed(out) if callable(out) else out
        return call


def models(config_path: str = CONFIG, seed: int = 0):
    """(config, MaskGIT, KA-MaskGIT) of a MaskGIT config with a graph block, in eval mode without gradients, the
    same backbone weights."""
    config = load_config_file(REPO / config_path)
    built = build_models(config, ("maskgit", "ka_maskgit"), seed)
    return config, built["maskgit"], built["ka_maskgit"]


def seconds(fn) -> tuple:
    """(wall seconds, CPU seconds of this process) of fn(); other work on the machine inflates the first more."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def isolated_fusion(cache: FusionCache, ids, cls, rounds: int = 10) -> dict:
    """Wall seconds of KA-MaskGIT's fusion alone, the best of several tries (other work on the machine only adds
    time): one injection (a round injects once before every layer; the fastest of `rounds` rounds, per injection)
    and the class terms of a batch (the fastest of 3, other classes each time: equal ids would reuse the terms)."""
    model = cache.model
    terms, inverse = cache.terms_for(cls)
    inject = model.fused_injection(ids, cache.tables, lambda point, dtype: terms[point].index_select(0, inverse))
    h = torch.randn(ids.shape[0], ids.shape[1] + 1, model.cfg.embed_dim)  # [B,1+L,dim]
    depth = len(model.blocks)
    for j in range(3):
        inject(j, h)
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for j in range(depth):
            inject(j, h)
        per_round.append(time.perf_counter() - t0)
    terms = []
    for shift in range(1, 4):
        t0 = time.perf_counter()
        cache.terms_for((cls + shift) % model.cfg.num_classes)
        terms.append(time.perf_counter() - t0)
    return {"inject": min(per_round) / depth, "class_terms": min(terms), "depth": depth}


def measure(args) -> dict:
    """{row: [wall seconds of each run]}, the same in CPU seconds, the fusion seconds of each KA-MaskGIT sampling
    run and the isolated fusion costs."""
    config, bare, ka = models(args.config)
    cache = FusionCache(ka)  # once per set of weights, as the scripts build it after loading
    timer = FusionTimer(cache)
    m = config.model
    ids, cls = token_inputs(config, args.batch, mask_token_id=bare.mask_token_id)
    cls = cls.clamp(max=m.num_classes - 1)  # the release's classes (no null class: no guidance)
    forwards = {"MaskGIT forward": bare, "KA-MaskGIT forward, FusionCache (sampling path)": cache,
                "KA-MaskGIT forward, graphs computed in the call (training path)": ka}
    samplers = {"MaskGIT sampling": bare, "KA-MaskGIT sampling, FusionCache": cache}

    def sample(model, seed):
        decode(model, cls, seq_len=m.seq_len, mask_token_id=bare.mask_token_id, steps=config.sample.steps,
               choice_temperature=config.sample.temp, generator=torch.Generator().manual_seed(seed))

    times = {name: [] for name in (*forwards, *samplers)}
    cpu = {name: [] for name in times}
    fusion = []
    with torch.no_grad():
        for name, model in forwards.items():  # warm-up: one call each
            model(ids, cls)
        for run in range(args.forward_repeats):
            for name, model in forwards.items():
                wall, used = seconds(lambda: model(ids, cls))
                times[name].append(wall)
                cpu[name].append(used)
        for run in range(args.repeats):
            for name, model in samplers.items():
                before = timer.seconds
                wall, used = seconds(lambda: sample(model, run))
                times[name].append(wall)
                cpu[name].append(used)
                if model is cache:
                    fusion.append(timer.seconds - before)
    alone = isolated_fusion(FusionCache(ka), ids, cls)
    return {"times": times, "cpu": cpu, "fusion": fusion, "isolated": alone, "steps": config.sample.steps,
            "forward_rows": list(forwards), "sampling_rows": list(samplers)}


def ratio_text(values, reference) -> str:
    return " ".join(f"{100 * (v / r - 1):+.1f}%" for v, r in zip(values, reference))


def table(result: dict, batch: int, steps: int) -> str:
    """The Markdown table: min seconds (wall and CPU), ratios of mins and paired ratios against the bare MaskGIT
    row; then the fusion's share of each KA-MaskGIT sampling run and its isolated cost."""
    t, c = result["times"], result["cpu"]
    lines = ["| row | wall s (min) | vs MaskGIT | paired by run (wall) | CPU s (min) | vs MaskGIT (CPU) | "
             "every run, wall s |", "|---|---|---|---|---|---|---|"]
    for group, unit in (("forward_rows", f"forward, batch {batch}"),
                        ("sampling_rows", f"{steps} steps, batch {batch}")):
        rows = result[group]
        ref, ref_cpu = t[rows[0]], c[rows[0]]
        for name in rows:
            v, u = t[name], c[name]
            lines.append(f"| {name} ({unit}) | {min(v):.3f} | {100 * (min(v) / min(ref) - 1):+.1f}% | "
                         f"{ratio_text(v, ref) if name != rows[0] else ''} | {min(u):.3f} | "
                         f"{100 * (min(u) / min(ref_cpu) - 1):+.1f}% | {' '.join(f'{x:.3f}' for x in v)} |")
    runs = t[result["sampling_rows"][1]]
    shares = [f / r for f, r in zip(result["fusion"], runs)]
    alone = result["isolated"]
    per_run = alone["class_terms"] + result["steps"] * alone["depth"] * alone["inject"]
    bare_run = min(t[result["sampling_rows"][0]])
    lines += ["", "Time inside KA-MaskGIT's fusion per sampling run: "
              + ", ".join(f"{f:.2f} s ({100 * s:.2f}%)" for f, s in zip(result["fusion"], shares)),
              f"Fusion alone: {1e3 * alone['inject']:.3f} ms per injection, {alone['class_terms']:.3f} s of class "
              f"terms per batch: {per_run:.2f} s per {result['steps']}-step run = {100 * per_run / bare_run:.2f}% of "
              f"the fastest bare MaskGIT run"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help=f"a MaskGIT config with a graph block (default {CONFIG})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="sampling runs per model")
    parser.add_argument("--forward-repeats", type=int, default=5, help="forward calls per row")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    result = measure(args)
    load_after = os.getloadavg()
    config = load_config_file(REPO / args.config)
    print(table(result, args.batch, config.sample.steps))
    print(f"\ntorch {torch.__version__}, {args.threads} threads, {time.perf_counter() - t0:.0f} s in all; load average "
          f"before {load_before[0]:.1f} (1 min) / {load_before[1]:.1f} (5 min), after {load_after[0]:.1f} / "
          f"{load_after[1]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        atomic_write_json(args.json, {**result, "config": args.config, "batch": args.batch, "threads": args.threads,
                                      "torch": torch.__version__, "load_before": load_before, "load_after": load_after})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
