"""Benchmark of the graph builders at ImageNet size: time and peak memory per graph.

    python -m benchmarks.graphs                  # 1,281,167 random 16x16 maps, 1024 codes, 1000 classes
    python -m benchmarks.graphs --maps 200000    # smaller

G_co and G_s are built from a seeded 50K-map subset (as the paper), G_p from all maps; G_co is also
built from all maps. Peak memory is reported three ways: the process's resident set sampled during
each step (includes torch), tracemalloc's peak of the step's numpy/Python allocations, and the
process's maximum RSS (resource.getrusage) at the end.
"""
import argparse
import os
import resource
import threading
import time
import tracemalloc

import numpy as np

from libs.config import load_config_file
from libs.graphs import recipes as G

RECIPE = load_config_file("configs/ka_mig_l.py").graph.recipe  # the paper's graph recipe

GIB = 2 ** 30


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling the resident set every few ms; .peak is the largest seen."""

    def __init__(self, interval=0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        """Sampling loop of the background thread."""
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(name, fn, rows):
    """Runs fn() and appends (name, wall s, cpu s, peak RSS, tracemalloc peak) to rows; returns fn()."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as rss:
        result = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    traced = tracemalloc.get_traced_memory()[1] - base
    rows.append((name, wall, cpu, rss.peak, traced))
    print(f"  {name}: {wall:.1f} s", flush=True)
    return result


def main(argv=None):
    """Builds the three graphs from random maps and prints a time / memory table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maps", type=int, default=1_281_167)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--sample", type=int, default=RECIPE.max_images, help="maps for G_co / G_s (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="counting threads (default: libs default)")
    p.add_argument("--skip-full-co", action="store_true", help="skip G_co from all maps")
    args = p.parse_args(argv)
    K, C, N = args.codes, args.classes, args.maps

    tracemalloc.start()
    rows = []
    t_start = time.perf_counter()
    print(f"{N} random {args.grid}x{args.grid} maps, {K} codes, {C} classes; {os.cpu_count()} CPUs", flush=True)
    rng = np.random.default_rng(0)
    maps = measure("generate maps", lambda: rng.integers(0, K, size=(N, args.grid, args.grid), dtype=np.uint16),
                   rows)  # [N,h,w]
    labels = rng.integers(0, C, size=N)  # [N]
    idx = G.sample_image_indices(N, args.sample, seed=0)
    sample = maps[idx]  # [n,h,w]
    n = len(idx)
    kw = dict(num_threads=args.threads)

    co_counts = measure(f"G_co counts, {n} maps", lambda: G.co_occurrence_counts(sample, K, **kw), rows)
    co = measure("G_co top-k + scaling", lambda: G.co_occurrence_graph(co_counts, RECIPE.co_ratio), rows)
    hist = measure(f"G_s histograms, {n} maps", lambda: G.position_histograms(sample, K, **kw), rows)
    sim = measure("G_s Jensen-Shannon + k-NN", lambda: G.similarity_graph(
        hist, RECIPE.sim_k, RECIPE.sim_alpha, RECIPE.sim_measure, frobenius_norm=RECIPE.sim_frobenius_norm), rows)
    packed = measure(f"G_p occurrence bits, {N} maps", lambda: G.occurrence_bits(maps, labels, C, K, **kw), rows)
    if not args.skip_full_co:
        full = measure(f"G_co counts, all {N} maps", lambda: G.co_occurrence_counts(maps, K, **kw), rows)
        measure("G_co top-k + scaling (all maps)", lambda: G.co_occurrence_graph(full, RECIPE.co_ratio), rows)
    total = time.perf_counter() - t_start

    print()
    print(f"{'step':<38} {'wall s':>8} {'cpu s':>8} {'peak RSS GiB':>13} {'traced GiB':>11}")
    for name, wall, cpu, peak, traced in rows:
        print(f"{name:<38} {wall:8.2f} {cpu:8.2f} {peak / GIB:13.2f} {traced / GIB:11.3f}")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"{'total (incl. generation)':<38} {total:8.2f} {time.process_time():8.2f} {max_rss / GIB:13.2f}")
    print(f"\nG_co: {co[1].shape[0]} edges; G_s: {sim[1].shape[0]} edges, weights*3 in "
          f"[{sim[1][:-K].min() * 3:.4f}, {sim[1][:-K].max() * 3:.4f}]; G_p: {packed.nbytes / 2 ** 20:.1f} MiB packed")
    print(f"maps array {maps.nbytes / GIB:.2f} GiB; load average {os.getloadavg()[0]:.1f} "
          f"(other processes on this machine inflate wall times; cpu s counts this process only)")


if __name__ == "__main__":
    main()
