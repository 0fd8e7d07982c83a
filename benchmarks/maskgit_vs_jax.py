"""Forward time of our MaskGIT (libs/models/maskgit.py) against the official JAX/Flax code on the same CPUs and threads.

    python -m benchmarks.maskgit_vs_jax --jax-python /tmp/jaxenv/bin/python \\
        --mirror /work/.mirror/google-research+maskgit --threads 2 --batch 2 --repeats 5 [--json out.json]

Needs (dev-only, never the test suite): `--jax-python`, an interpreter with JAX, Flax and ml_collections
(requirements-fixtures.txt, installed into a separate venv such as /tmp/jaxenv, never into .venv), and `--mirror`, a
git mirror of google-research/maskgit (its bare git dir, or a folder holding it as `repo/`); a few GB of memory.

As tools/make_maskgit_fixtures.py, the official `maskgit/` package of the mirror's HEAD is unpacked into a temp folder
and this file re-runs itself there under `--jax-python` in worker mode, importing only the official modules, JAX and
numpy. The worker builds the official `ImageNet_class_conditional_generator` at its own config (the ImageNet 256
release: 24 layers, width 768, 16 heads, 1024 codes, 1000 classes, 257 positions; no checkpoint is read), creates
the weights once with the official init (PRNGKey(0): truncated normal 0.02 kernels and embeddings), then replaces
every bias by N(0, 0.02) and every LayerNorm scale by 1 + N(0, 0.1) (seeded numpy, so that no converted tensor is
trivially 0 or 1), and writes them with flax.serialization into the temp folder. This process converts that file
with tools/convert_maskgit.py and loads it through libs.models.factory.load_model (configs/maskgit.py).

Input: the same fixed rows for both, [B,257] = class token (K + label) then 256 codes with about half the places
[MASK] (written -1 for the official code, as its inference does; our id V-1). Timed calls:
  - JAX: `jax.jit` of the official inference's `tokens_to_logits` (`Transformer.apply(variables, seq,
    deterministic=True)[..., :K]`, the variables passed as an argument), compiled once before timing (lower and
    compile timed separately), each call ended by block_until_ready(), timed inside the worker;
  - ours: `model(ids, class_ids)` (logits [B,256,K], what our samplers call) in eval mode under
    torch.inference_mode, fp32, loaded twice: `cpu_kernels='default'` (F.linear, MKL) and `cpu_kernels='onednn'`
    (the sampling scripts' default: every linear of the layers and head through oneDNN, the tanh GELU fused into
    the first dense of each MLP and of the head; the tied head product F.linear(h, E, bias) stays).
Runs are interleaved (run i of every row back to back, the order alternating between runs), after one warm-up call
each. Threads: both processes are pinned (sched_setaffinity) to the same first N CPUs of this process's set; torch
gets torch.set_num_threads(N); the worker gets XLA_FLAGS="--xla_cpu_multi_thread_eigen=<true if N > 1 else false>
intra_op_parallelism_threads=N", OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS = N and
JAX_PLATFORMS=cpu (jaxlib 0.10.2 keeps more pool threads busy than N whatever XLA_FLAGS says, so the pinning is
what bounds it to N cores).
Agreement (every row's model): the max |logit difference| over [B,257,K] (the official restriction to the first K
columns, every position) and over the timed [B,256,K]; the run fails (exit 1) if either exceeds 1e-3. The load
average before and after is printed: other work on the machine inflates single runs, the minimum is the least
disturbed figure.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/maskgit.py"
TOLERANCE = 1e-3  # max |logit difference| allowed between the two implementations
SEED = 0
EXPECTED = dict(num_layers=24, num_embeds=768, num_heads=16, intermediate_size=3072, codebook_size=1024,
                num_class=1000, positions=257)


# ----------------------------------------------------------------------------- worker (JAX interpreter)


def perturb(tree, rng, path=()):
    """The tree with biases ~ N(0, 0.02) and LayerNorm scales ~ 1 + N(0, 0.1); kernels and embeddings kept."""
    if isinstance(tree, dict):
        return {k: perturb(tree[k], rng, path + (k,)) for k in sorted(tree)}
    a = np.asarray(tree, np.float32)
    if path[-1] == "bias":
        return (0.02 * rng.standard_normal(a.shape)).astype(np.float32)
    if path[-1] == "scale":
        return (1.0 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    return a


def official_model(src: Path):
    """(jax, generator) of the official code unpacked in `src`, at the release config, no checkpoint read."""
    sys.path[:0] = [str(src), str(REPO)]
    from tools.make_maskgit_fixtures import stub_modules  # plotting / TF stand-ins, nothing official copied
    stub_modules()
    import jax
    import jax.numpy as jnp
    jnp.DeviceArray = jax.Array  # the release annotates with this old name (removed from JAX since)
    from maskgit import inference
    inference.ImageNet_class_conditional_generator._load_checkpoints = lambda self: None
    gen = inference.ImageNet_class_conditional_generator(image_size=256)
    t, cf = gen.maskgit_cf.transformer, gen.maskgit_cf
    sizes = dict(num_layers=t.num_layers, num_embeds=t.num_embeds, num_heads=t.num_heads,
                 intermediate_size=t.intermediate_size, codebook_size=cf.vqvae.codebook_size,
                 num_class=cf.num_class, positions=gen.transformer_block_size)
    if sizes != EXPECTED:
        raise SystemExit(f"the official config has sizes {sizes}, expected {EXPECTED}")
    return jax, gen


def worker(src: Path, out: Path, cpus: list):
    """Writes transformer.msgpack and logits.npy into `out`, then answers 'time' lines on stdin with one timed
    forward each (JSON lines on the original stdout) until 'quit' or EOF."""
    os.sched_setaffinity(0, cpus)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, the protocol stays clean
    jax, gen = official_model(src)
    from flax import serialization
    K = gen.maskgit_cf.vqvae.codebook_size
    tokens = np.load(out / "tokens.npy").astype(np.int32)  # [B,257]
    init = gen.transformer_model.init(jax.random.PRNGKey(SEED), tokens[:1])
    variables = {"params": perturb(jax.device_get(init["params"]), np.random.default_rng(SEED))}
    (out / "transformer.msgpack").write_bytes(serialization.to_bytes(variables))

    def tokens_to_logits(v, seq):  # what generate_samples decodes with: the first K columns
        return gen.transformer_model.apply(v, seq, deterministic=True)[..., :K]

    v, seq = jax.device_put(variables), jax.device_put(tokens)
    t0 = time.perf_counter()
    lowered = jax.jit(tokens_to_logits).lower(v, seq)
    t1 = time.perf_counter()
    forward = lowered.compile()
    t2 = time.perf_counter()
    logits = forward(v, seq).block_until_ready()
    t3 = time.perf_counter()
    np.save(out / "logits.npy", np.asarray(logits))
    import flax
    proto.write(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t3 - t2,
                            "jax": jax.__version__, "flax": flax.__version__}) + "\n")
    for line in sys.stdin:
        if line.strip() != "time":
            break
        w0, c0 = time.perf_counter(), time.process_time()
        forward(v, seq).block_until_ready()
        proto.write(json.dumps({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}) + "\n")


# ----------------------------------------------------------------------------- main (the repo's interpreter)


def git_dir(mirror: Path) -> Path:
    """The git dir of the mirror: `mirror` itself or its `repo/`; MissingInput if neither holds a HEAD."""
    from libs.errors import MissingInput
    for candidate in (mirror, mirror / "repo"):
        if (candidate / "HEAD").is_file():
            return candidate
    raise MissingInput(f"--mirror {mirror}: no git dir there (no HEAD in it or in its repo/); expected a mirror "
                       f"of google-research/maskgit")


def fixed_tokens(batch: int, K: int, classes: int, seq_len: int) -> np.ndarray:
    """[B,1+L] seeded rows: class token K + label, then codes with about half the places -1 ([MASK])."""
    rng = np.random.default_rng(SEED)
    codes = rng.integers(0, K, (batch, seq_len))
    codes[rng.random((batch, seq_len)) < 0.5] = -1
    labels = rng.integers(0, classes, (batch, 1))
    return np.concatenate([labels + K, codes], axis=1).astype(np.int64)


class Worker:
    """The JAX worker process: start() waits until it has compiled; time() asks for one timed forward."""

    def __init__(self, args, src: Path, out: Path, cpus: list):
        threads = str(args.threads)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="", OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
                   XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'} "
                             f"intra_op_parallelism_threads={threads}")
        self.env = {k: env[k] for k in ("JAX_PLATFORMS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                        "OPENBLAS_NUM_THREADS", "XLA_FLAGS")}
        self.log = open(out / "worker.log", "w")
        self.proc = subprocess.Popen(
            [args.jax_python, str(Path(__file__).resolve()), "--worker", str(src), str(out),
             ",".join(map(str, cpus))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env=env, text=True)
        self.out = out

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            tail = (self.out / "worker.log").read_text()[-3000:]
            raise RuntimeError(f"the JAX worker ended (status {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def time(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def our_models(msgpack_path: Path, folder: Path):
    """({row name: our MaskGIT} loaded through load_model from the converted file with cpu_kernels 'default' and
    'onednn', the number of OneDNNLinear layers of the second)."""
    from dataclasses import asdict

    from libs.checkpoint import save_weights
    from libs.config import load_config_file
    from libs.models.cpu_kernels import onednn_layer_count
    from libs.models.factory import load_model
    from libs.models.maskgit import maskgit_config
    from tools.convert_maskgit import convert_transformer, read_flax_msgpack

    config = load_config_file(REPO / CONFIG)
    state, cfg = convert_transformer(read_flax_msgpack(msgpack_path, "the worker's transformer"), 1024)
    want = asdict(maskgit_config(config.model))
    got = asdict(cfg)
    sizes = [k for k in want if k not in ("dropout", "use_checkpoint") and want[k] != got[k]]
    if sizes:
        raise SystemExit(f"converted sizes differ from {CONFIG}: {[(k, got[k], want[k]) for k in sizes]}")
    path = save_weights(state, folder / "maskgit.safetensors", {"model": got})
    onednn = load_model(config, "maskgit", checkpoint=path, cpu_kernels="onednn")
    models = {"ours, fp32": load_model(config, "maskgit", checkpoint=path, cpu_kernels="default"),
              "ours, fp32, cpu_kernels='onednn'": onednn}
    return models, onednn_layer_count(onednn)


def agreement(model, tokens: np.ndarray, official: np.ndarray) -> dict:
    """Max |our - official| logits over [B,L+1,K] (forward_tokens, the official restriction) and over the timed
    output [B,L,K] of model(ids, class_ids)."""
    import torch
    K = model.codebook_size
    t = torch.from_numpy(tokens)
    ids = t[:, 1:].masked_fill(t[:, 1:] < 0, model.mask_token_id)
    with torch.inference_mode():
        full = model.forward_tokens(t)[..., :K].numpy()
        timed = model(ids, t[:, 0] - K).numpy()
    return {"all_positions": float(np.abs(full - official).max()),
            "timed": float(np.abs(timed - official[:, 1:]).max()),
            "official_logit_scale": float(np.abs(official).max())}


def measure(args, worker: Worker, models: dict, tokens: np.ndarray) -> dict:
    """{row: {'wall': [...], 'cpu': [...]}} of interleaved runs (order alternating), after one warm-up each."""
    import torch
    K = next(iter(models.values())).codebook_size
    t = torch.from_numpy(tokens)
    ids = t[:, 1:].masked_fill(t[:, 1:] < 0, next(iter(models.values())).mask_token_id)
    cls = t[:, 0] - K

    def ours(model):
        def run():
            w0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                model(ids, cls)
            return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
        return run

    rows = {"official JAX (jit)": worker.time, **{name: ours(m) for name, m in models.items()}}
    for run in rows.values():
        run()  # warm-up
    times = {name: {"wall": [], "cpu": []} for name in rows}
    for i in range(args.repeats):
        order = list(rows) if i % 2 == 0 else list(rows)[::-1]
        for name in order:
            got = rows[name]()
            for k in ("wall", "cpu"):
                times[name][k].append(got[k])
    return times


def table(times: dict, batch: int) -> str:
    """Markdown: min and median wall seconds, the ratio of minima and paired ratios against the JAX row, CPU s."""
    ref_name = next(iter(times))
    ref = times[ref_name]["wall"]
    lines = [f"| forward, batch {batch} | wall s (min) | wall s (median) | min / JAX min | paired by run | "
             "CPU s (min) | every run, wall s |", "|---|---|---|---|---|---|---|"]
    for name, t in times.items():
        w = t["wall"]
        paired = " ".join(f"{a / b:.2f}" for a, b in zip(w, ref)) if name != ref_name else ""
        lines.append(f"| {name} | {min(w):.3f} | {statistics.median(w):.3f} | {min(w) / min(ref):.2f} | {paired} | "
                     f"{min(t['cpu']):.3f} | {' '.join(f'{x:.3f}' for x in w)} |")
    return "\n".join(lines)


def parse(argv=None):
    """The flags; a missing --jax-python or --mirror, or threads/batch/repeats < 1, exit with status 2."""
    from libs.cli import ArgumentParser
    parser = ArgumentParser(prog="python -m benchmarks.maskgit_vs_jax", description=__doc__.splitlines()[0])
    parser.add_argument("--jax-python", required=True, help="interpreter with JAX, Flax, ml_collections "
                                                            "(requirements-fixtures.txt)")
    parser.add_argument("--mirror", type=Path, required=True, help="git mirror of google-research/maskgit")
    parser.add_argument("--threads", type=int, default=2, help="threads (and CPUs) of both sides (default 2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per row (default 5)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for key in ("threads", "batch", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} {getattr(args, key)}: must be at least 1")
    return args


def main(argv=None):
    args = parse(argv)
    import torch

    from libs.atomic_io import atomic_write_json
    from libs.cli import check_writable
    from libs.errors import BadInput, MissingInput
    from tools.make_maskgit_fixtures import unpack_sources

    if not Path(args.jax_python).is_file():
        raise MissingInput(f"--jax-python {args.jax_python}: no such interpreter (a venv with "
                           f"requirements-fixtures.txt, e.g. /tmp/jaxenv/bin/python)")
    mirror = git_dir(args.mirror)
    allowed = sorted(os.sched_getaffinity(0))
    if args.threads > len(allowed):
        raise BadInput(f"--threads {args.threads}: this process may use only {len(allowed)} CPUs")
    if args.json:
        check_writable(args.json)
    cpus = allowed[: args.threads]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(args.threads)
    load_before, t_start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        unpack_sources(mirror, src)
        tokens = fixed_tokens(args.batch, EXPECTED["codebook_size"], EXPECTED["num_class"], EXPECTED["positions"] - 1)
        np.save(out / "tokens.npy", tokens)
        worker = Worker(args, src, out, cpus)
        try:
            compiled = worker.reply()  # the worker has written the weights, compiled and run once
            models, swapped = our_models(out / "transformer.msgpack", Path(tmp))
            official = np.load(out / "logits.npy")
            diff = {name: agreement(m, tokens, official) for name, m in models.items()}
            for name, d in diff.items():
                print(f"max |logit difference| {name} vs official: {d['all_positions']:.3g} over [B,257,K], "
                      f"{d['timed']:.3g} over the timed [B,256,K] (largest |official logit| "
                      f"{d['official_logit_scale']:.3g}; tolerance {TOLERANCE:g})")
            if max(max(d["all_positions"], d["timed"]) for d in diff.values()) > TOLERANCE:
                print(f"FAIL: logits differ by more than {TOLERANCE:g}", file=sys.stderr)
                return 1
            times = measure(args, worker, models, tokens)
        finally:
            worker.close()
    load_after = os.getloadavg()
    print(table(times, args.batch))
    print(f"\nJAX compile (not in the rows): lower {compiled['lower_s']:.2f} s, compile {compiled['compile_s']:.2f} s, "
          f"first call {compiled['first_call_s']:.2f} s")
    print(f"cpu_kernels='onednn' runs {swapped} linears of MaskGIT through oneDNN")
    print(f"jax {compiled['jax']}, flax {compiled['flax']}, torch {torch.__version__}; {args.threads} threads on CPUs "
          f"{cpus}; worker env {worker.env}; {time.perf_counter() - t_start:.0f} s in all; load average before "
          f"{load_before[0]:.2f} (1 min) / {load_before[1]:.2f} (5 min), after {load_after[0]:.2f} / "
          f"{load_after[1]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        atomic_write_json(args.json, {"times": times, "compile": compiled, "logit_diff": diff, "threads": args.threads,
                                      "cpus": cpus, "batch": args.batch, "repeats": args.repeats,
                                      "worker_env": worker.env, "onednn_swapped": swapped, "torch": torch.__version__,
                                      "load_before": load_before, "load_after": load_after})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # under --jax-python: SRC OUT CPUS
        worker(Path(sys.argv[2]), Path(sys.argv[3]), [int(c) for c in sys.argv[4].split(",")])
    else:
        from libs.cli import run_main
        run_main(main)
