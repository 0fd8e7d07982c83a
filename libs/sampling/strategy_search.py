"""Gradient-free search of a T-step decoding strategy against FID (docs/reference.md#strategy-search).

    python -m libs.sampling.strategy_search --config configs/demo.py --checkpoint <model> --steps 8 \\
        --num-samples 300 --ref-stats <ref.npz> --iterations 8 --offspring 4 --out <folder>
    torchrun --nproc_per_node=8 -m libs.sampling.strategy_search ...     # each rank samples a share

A strategy is the per-step lists of the decoder (`libs.sampling.decoding.Schedule`): re-mask ratios (T-1),
confidence temperatures (T-1), sample temperatures (T) and guidance (T), 4T-2 numbers. The search works on an
unconstrained vector of that length (`encode` / `decode`) whose every value is a valid strategy: ratios
r_0 = sigmoid(u_0), r_k = r_{k-1} * sigmoid(u_k) (so 1 > r_0 > r_1 > ... > 0), temperatures exp(u), guidance u^2
(>= 0). The objective of a strategy is the FID of N samples (labels balanced over the classes, per-index seeds
from --sample-seed, as generate_npz.py) against reference statistics; every candidate uses the same samples'
seeds, so candidates differ by their strategy only.

The search is a seeded (1+lambda) evolution strategy (`evolution_strategy`): from the start (the published
T = 8 strategy, configs/autonat_t8_strategy.py, when T = 8; else MaskGIT's cosine schedule with T steps; or
--strategy / --schedule), each iteration draws lambda Gaussian steps of size sigma around the best vector so
far, evaluates them, keeps the best if it is strictly better, and adapts sigma by the one-fifth rule (x1.5 on
success, x1.5^(-1/4) otherwise). Every evaluation is appended to <out>/search_log.jsonl (its first line holds
the settings); a rerun with the same settings replays the log (the search is deterministic given the logged
objectives), so nothing is evaluated twice and an interrupted run ends exactly where an uninterrupted one
would. A log made with other settings is refused (--overwrite starts afresh). --iterations may grow between
runs: the longer search continues the shorter one.

At the end the best strategy is written as <out>/best_strategy.py (a get_config() file, loaded by
generate_img.py / generate_npz.py with --strategy) beside <out>/start_strategy.py, and both are evaluated on
--heldout-seeds fresh sample seeds (never the search's): <out>/result.json holds the search objective and the
held-out FIDs (each seed, mean and std, paired differences), so over-fitting to the search's seeds shows.

A user error ends with one line `error: ...`, exit status 2. Logits that turn NaN/inf while a candidate is
sampled (e.g. an fp16 overflow) stop the search with one line naming the decoding step, the precision and what
to try, exit status 1; that evaluation is not logged (the precision is one of the log's settings: rerun with
another --precision into a new --out, or with --overwrite).
"""
import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np
import torch

from libs.atomic_io import atomic_write_json, atomic_write_text
from libs.checkpoint import file_sha256, require_file
from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import parse_args_with_config
from libs.distributed import Distributed
from libs.errors import BadInput
from libs.folder_lock import FolderLock
from libs.evaluation import metrics
from libs.evaluation.fid_stats import extract_features, load_reference_stats
from libs.evaluation.inception import CONVERTED_CACHE, FEATURE_DIM, load_feature_extractor
from libs.models.factory import DEFAULT_CHECKPOINTS, load_tokenizer_and_model
from libs.sampling.decoding import Schedule, schedule_from_config
from libs.sampling.generation import (add_sampling_flags, check_graphs_tokenizer, check_inputs, class_labels,
                                      compile_token_model, index_generators, sample_images, schedule_args,
                                      schedule_from_flags)
from libs.sampling.provenance import fingerprint_diff, labels_sha256, sampling_fingerprint
from libs.training import tracking

LOG_FILE = "search_log.jsonl"
BEST_FILE = "best_strategy.py"
START_FILE = "start_strategy.py"
RESULT_FILE = "result.json"
PUBLISHED_T8 = "configs/autonat_t8_strategy.py"
SEARCH_VERSION = 1  # bump when the parametrisation or the search arithmetic changes (old logs are then refused)
U_RATIO, U_TEMP = 20.0, 10.0  # |u| bounds: sigmoid(20) < 1 and exp(+-10) keep every strategy finite and valid
RATIO_KEYS = ("ratios", "conf_temps", "sample_temps", "guidance")


# ----------------------------------------------------------------------------- parametrisation


def num_params(steps: int) -> int:
    """Numbers in a T-step strategy: ratios T-1, confidence temperatures T-1, sample temperatures T, guidance T."""
    return 4 * steps - 2


def _logit(p):
    return math.log(p) - math.log1p(-p)


def _sigmoid(u):
    return 1.0 / (1.0 + math.exp(-u))


def encode(schedule: Schedule) -> np.ndarray:
    """float64 [4T-2]: the unconstrained vector whose `decode` is `schedule` (up to float rounding).

    Layout: [logit ratio steps (T-1) | log conf temps (T-1) | log sample temps (T) | sqrt guidance (T)].
    Needs 1 > ratio_0 > ratio_1 > ... > 0, positive temperatures and guidance >= 0 (BadInput otherwise).
    """
    r = [float(v) for v in schedule.ratios]
    if any(not 0 < v < 1 for v in r) or any(b >= a for a, b in zip(r, r[1:])):
        raise BadInput(f"a strategy to search from needs decreasing ratios in (0, 1), got {r}")
    temps = [float(v) for v in list(schedule.conf_temps) + list(schedule.sample_temps)]
    if any(not v > 0 for v in temps):
        raise BadInput(f"a strategy to search from needs positive temperatures, got {temps}")
    if any(not float(g) >= 0 for g in schedule.guidance):
        raise BadInput(f"a strategy to search from needs guidance >= 0, got {list(schedule.guidance)}")
    u_ratio = [_logit(r[0])] + [_logit(b / a) for a, b in zip(r, r[1:])] if r else []
    u = (u_ratio + [math.log(v) for v in schedule.conf_temps] + [math.log(v) for v in schedule.sample_temps]
         + [math.sqrt(float(g)) for g in schedule.guidance])
    return np.asarray(u, dtype=np.float64)


def decode(u, steps: int) -> dict:
    """The strategy (config keys of `schedule: autonat`) of an unconstrained vector u [4T-2]; always valid."""
    u = np.asarray(u, dtype=np.float64)
    if u.shape != (num_params(steps),):
        raise ValueError(f"a {steps}-step strategy has {num_params(steps)} numbers, got shape {u.shape}")
    n = steps - 1
    ratios, r = [], 1.0
    for v in np.clip(u[:n], -U_RATIO, U_RATIO):
        r = r * _sigmoid(float(v))
        ratios.append(r)
    conf = [math.exp(float(v)) for v in np.clip(u[n:2 * n], -U_TEMP, U_TEMP)]
    sample = [math.exp(float(v)) for v in np.clip(u[2 * n:2 * n + steps], -U_TEMP, U_TEMP)]
    guidance = [float(v) ** 2 for v in u[2 * n + steps:]]
    return {"schedule": "autonat", "ratios": ratios, "conf_temps": conf, "sample_temps": sample,
            "guidance": guidance}


def strategy_schedule(strategy: dict) -> Schedule:
    """The Schedule of a strategy dict (keys of STRATEGY_KEYS; absent optional keys take their defaults)."""
    cfg = ml_collections.ConfigDict({"guidance_schedule": "linear", "guidance_power": 1.0, "guidance_steps": "all",
                                     "order": "confidence", **strategy})
    try:
        return schedule_from_config(cfg)
    except (ValueError, KeyError, AttributeError) as e:
        raise BadInput(f"not a usable decoding strategy ({e})") from e


def strategy_id(strategy: dict) -> str:
    """A short stable hash of a strategy dict."""
    return hashlib.sha256(json.dumps(strategy, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the search


@dataclass
class SearchSettings:
    iterations: int = 8      # generations of the evolution strategy
    offspring: int = 4       # lambda: candidates per generation
    sigma: float = 0.15      # initial step size in the unconstrained space
    seed: int = 0            # seed of the Gaussian steps
    sigma_min: float = 1e-3
    sigma_max: float = 2.0


def evolution_strategy(x0, evaluate, settings: SearchSettings, start=None) -> dict:
    """Seeded (1+lambda) evolution strategy minimising evaluate(vector, strategy) (see the module docstring).

    `start`: the strategy dict evaluated first for x0 (default decode(x0)); candidates are decode(x).
    Deterministic given the objective values. Returns {'x', 'objective', 'strategy', 'sigma', 'evaluations'}.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    steps = (len(x0) + 2) // 4
    rng = np.random.default_rng(settings.seed)
    x, strategy = x0, start if start is not None else decode(x0, steps)
    fx = evaluate(x, strategy, iteration=0)
    sigma, evaluations = settings.sigma, 1
    for it in range(1, settings.iterations + 1):
        steps_drawn = rng.standard_normal((settings.offspring, len(x0)))
        best = None
        for z in steps_drawn:
            y = x + sigma * z
            cand = decode(y, steps)
            fy = evaluate(y, cand, iteration=it)
            evaluations += 1
            if best is None or fy < best[0]:
                best = (fy, y, cand)
        if best[0] < fx:
            fx, x, strategy = best
            sigma *= 1.5
        else:
            sigma *= 1.5 ** -0.25
        sigma = float(min(max(sigma, settings.sigma_min), settings.sigma_max))
    return {"x": x, "objective": fx, "strategy": strategy, "sigma": sigma, "evaluations": evaluations,
            "start": start if start is not None else decode(x0, steps)}


class LoggedObjective:
    """evaluate(vector, strategy, iteration) that answers from a search log first, then computes and logs.

    `entries` are the log's evaluation records in order; the k-th call must ask for the k-th logged strategy
    (else the log belongs to another search: BadInput). `compute(strategy) -> float` runs the objective;
    `on_new(record)` is called with each new record (rank 0 appends it to the log).
    """

    def __init__(self, entries, compute, on_new=None, stop_after=None):
        self.entries, self.compute, self.on_new, self.stop_after = list(entries), compute, on_new, stop_after
        self.calls, self.new = 0, 0

    def __call__(self, vector, strategy, iteration):
        k = self.calls
        self.calls += 1
        vector = [float(v) for v in vector]
        if k < len(self.entries):
            logged = self.entries[k]
            if logged["vector"] != vector or logged["strategy"] != strategy:
                raise BadInput(f"search log entry {k} holds another candidate than this search draws; the log was "
                               "written by other code or edited (pass --overwrite to start afresh)")
            return float(logged["objective"])
        if self.stop_after is not None and self.new >= self.stop_after:
            raise SystemExit(f"stopping after {self.new} new evaluations as asked (--stop-after-evals)")
        value = float(self.compute(strategy))
        self.new += 1
        record = {"type": "eval", "eval": k, "iteration": iteration, "objective": value, "strategy": strategy,
                  "vector": vector}
        self.entries.append(record)
        if self.on_new is not None:
            self.on_new(record)
        return value


# ----------------------------------------------------------------------------- the log


def read_log(path):
    """(settings or None, records) of a search log; BadInput if it cannot be parsed."""
    path = Path(path)
    if not path.exists():
        return None, []
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines or "settings" not in lines[0]:
            raise ValueError("first line holds no settings")
        return lines[0]["settings"], lines[1:]
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(f"{path} is not a readable search log ({e}); pass --overwrite to start afresh or choose "
                       "another --out") from e


def write_log(path, settings: dict, records: list):
    """The whole log, atomically: the settings line, then one JSON line per record."""
    lines = [json.dumps({"settings": settings}, sort_keys=True)] + [json.dumps(r, sort_keys=True) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- strategy files


def strategy_file_text(strategy: dict, comment: str) -> str:
    """A config file with get_config() holding `strategy` (floats written exactly: repr round-trips)."""
    lines = [f'"""{comment}"""', "import ml_collections", "", "", "def get_config():",
             "    c = ml_collections.ConfigDict()"]
    for key, value in strategy.items():
        if isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        lines.append(f"    c.{key} = {value!r}")
    lines.append("    return c")
    return "\n".join(lines) + "\n"


def write_strategy_file(path, strategy: dict, comment: str):
    atomic_write_text(path, strategy_file_text(strategy, comment))


# ----------------------------------------------------------------------------- FID objective


def gather_to_rank0(dist, obj):
    """[obj of every rank] on rank 0 (None elsewhere); [obj] alone."""
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world if dist.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


class FIDObjective:
    """FID of the N samples a strategy gives (labels and per-index seeds fixed) against reference statistics.

    Each rank samples and extracts the Inception features of indices rank, rank + world, ...; rank 0 puts them
    back in index order, computes the FID and sends it to every rank (all ranks return the same value).
    """

    def __init__(self, model, tokenizer, labels, ref, extractor, dist, *, batch_size, precision, pixels, device):
        self.model, self.tokenizer, self.labels, self.ref, self.extractor = model, tokenizer, labels, ref, extractor
        self.dist, self.batch_size, self.precision = dist, batch_size, precision
        self.pixels, self.device = pixels, device

    def __call__(self, strategy: dict, sample_seed: int) -> float:
        schedule = strategy_schedule(strategy)
        mine = np.arange(len(self.labels))[self.dist.rank::self.dist.world]
        images = []
        for s in range(0, len(mine), self.batch_size):
            idx = mine[s:s + self.batch_size]
            cls = torch.as_tensor(self.labels[idx], device=self.device)
            images.append(sample_images(self.model, self.tokenizer, cls, schedule,
                                        index_generators(idx, sample_seed, self.device), self.precision,
                                        pixels=self.pixels))
        feats = (extract_features(np.concatenate(images), self.extractor, self.batch_size, progress=False)[0]
                 if images else np.zeros((0, FEATURE_DIM)))
        parts = gather_to_rank0(self.dist, (mine, feats))
        value = None
        if self.dist.is_main:
            order = np.concatenate([p[0] for p in parts])
            pool = np.concatenate([p[1] for p in parts])[np.argsort(order, kind="stable")]
            mu, sigma = metrics.feature_statistics(pool)
            value = float(metrics.frechet_distance(mu, sigma, self.ref["mu"], self.ref["sigma"]))
        return float(self.dist.broadcast(value))


# ----------------------------------------------------------------------------- CLI


def build_parser():
    parser = ArgumentParser(prog="python -m libs.sampling.strategy_search", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser, helps={  # --model --checkpoint --strategy/--schedule/--steps/... (the start) ...
        "--steps": "number of decoding steps T of the searched strategy (default 8: the published AutoNAT-L "
                   "strategy is the start; other T start from MaskGIT's cosine schedule)",
        "--seed": "seed of the search's random steps (the samples' seeds are --sample-seed)",
        "--overwrite": "start afresh: delete the search log, strategies and result an earlier run left in --out "
                       "(otherwise a log made with other settings is refused)"})
    parser.set_defaults(batch_size=50)
    parser.add_argument("--num-samples", dest="num", type=int, default=300, help="samples per evaluated strategy")
    parser.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    parser.add_argument("--sample-seed", type=int, default=0,
                        help="seed of the samples of every candidate during the search (per-index seeds)")
    parser.add_argument("--iterations", type=int, default=8, help="generations of the evolution strategy")
    parser.add_argument("--offspring", type=int, default=4, help="candidates per generation (lambda)")
    parser.add_argument("--sigma", type=float, default=0.15, help="initial step size (unconstrained space)")
    parser.add_argument("--heldout-seeds", type=int, default=3,
                        help="fresh sample seeds on which the start and the best are evaluated after the search")
    parser.add_argument("--heldout-seed-base", type=int, default=1000, help="the held-out seeds are base, base+1, ...")
    parser.add_argument("--ref-stats", default="assets/VIRTUAL_imagenet256_labeled.npz",
                        help="reference statistics npz with mu/sigma (python -m libs.evaluation.fid_stats)")
    parser.add_argument("--inception-weights", default=None, help="pytorch-fid FID weights (see generate_npz.py)")
    parser.add_argument("--inception-cache", default=None, help="cache of the converted offline Inception")
    parser.add_argument("--out", default="output/strategy_search", help="folder of the log, strategies and result")
    parser.add_argument("--stop-after-evals", type=int, default=None,
                        help="testing aid: exit after this many new evaluations (simulates a crash)")
    tracking.add_log_with_flag(parser)
    return parser


def start_strategy(args, config) -> dict:
    """The strategy dict the search starts from (see the module docstring), with config.sample set to it."""
    T = args.steps or 8
    if args.strategy:
        schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp, **schedule_args(args))
    elif args.schedule == "maskgit" or (args.schedule is None and T != 8):
        schedule_from_flags(config, "maskgit", T, args.cfg, args.temp, **schedule_args(args))
    elif T == 8:
        schedule_from_flags(config, "autonat", None, None, None, **{**schedule_args(args), "strategy": PUBLISHED_T8})
    else:
        raise BadInput(f"--schedule autonat has no {T}-step strategy to start from; give one with --strategy")
    s = config.sample
    keys = (("schedule", "ratios", "conf_temps", "sample_temps", "guidance") if s.schedule == "autonat" else
            ("schedule", "steps", "cfg_scale", "temp", "guidance_schedule", "guidance_power"))
    strategy = {k: (list(s[k]) if isinstance(s[k], (list, tuple)) else s[k]) for k in keys}
    for key, default in (("guidance_steps", "all"), ("order", "confidence")):
        if s.get(key, default) != default:
            strategy[key] = s[key]
    schedule = strategy_schedule(strategy)
    if schedule.steps != T:
        raise BadInput(f"the start strategy has {schedule.steps} steps, --steps asks for {T}")
    return json.loads(json.dumps(strategy))


def check_args(args):
    for name, value, low in (("--num-samples", args.num, 2), ("--iterations", args.iterations, 0),
                             ("--offspring", args.offspring, 1), ("--heldout-seeds", args.heldout_seeds, 0)):
        if value < low:
            raise BadInput(f"{name} must be at least {low}, got {value}")
    if not args.sigma > 0:
        raise BadInput(f"--sigma must be positive, got {args.sigma}")
    if args.seed < 0:
        raise BadInput(f"--seed must be at least 0 (numpy.random.default_rng takes no negative seed), got {args.seed}")
    heldout = heldout_seeds(args)
    if args.sample_seed in heldout:
        raise BadInput(f"the held-out seeds {heldout} include the search's --sample-seed {args.sample_seed}")
    tracking.check_log_with(args.log_with)


def heldout_seeds(args) -> list:
    return [args.heldout_seed_base + k for k in range(args.heldout_seeds)]


def main(argv=None):
    args, config = parse_args_with_config(build_parser(), "configs/ka_mig_l.py", argv)
    check_args(args)
    seeds = {"--sample-seed": args.sample_seed, "--heldout-seed-base": args.heldout_seed_base,
             "--heldout-seed-base + --heldout-seeds - 1": max(heldout_seeds(args), default=args.heldout_seed_base)}
    pixels = check_inputs(args, config, sample_seeds=seeds)  # every seed a sample generator is seeded from
    check_graphs_tokenizer(config, args.model)  # the tokenizer the graphs' tokens were made with, if recorded
    start = start_strategy(args, config)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[args.model]
    load_reference_stats(args.ref_stats, dims=FEATURE_DIM)  # checked before any sampling
    if args.inception_weights:
        require_file(args.inception_weights)
    out = Path(args.out)
    dist = Distributed()
    lock = FolderLock(out, "--out folder", "or choose another --out")
    try:
        lock.acquire_on_main(dist)  # one search per --out (rank 0 holds the lock): a second one stops here
        dist.on_main(check_writable, out / LOG_FILE, out / BEST_FILE, out / RESULT_FILE)  # one rank probes
        return run(args, config, dist, checkpoint, pixels, start, out)
    finally:
        lock.release()
        dist.close()


def search_settings(args, config, checkpoint, pixels, start, labels, device) -> dict:
    """What decides the search's candidates and objectives (compared with a log's settings before a rerun)."""
    fingerprint = sampling_fingerprint(config, kind=args.model, checkpoint=checkpoint,
                                       schedule=strategy_schedule(start), seed=args.sample_seed,
                                       label_mode=args.labels, labels=labels, precision=args.precision,
                                       cpu_kernels=args.cpu_kernels, pixels=pixels, device=device,
                                       compile=args.compile)
    fingerprint.pop("schedule")  # the start strategy is recorded as given
    return json.loads(json.dumps({
        "search_version": SEARCH_VERSION, "sampling": fingerprint, "start": start,
        "steps": strategy_schedule(start).steps,
        "objective": {"kind": "fid", "num_samples": int(len(labels)), "labels_sha256": labels_sha256(labels),
                      "sample_seed": int(args.sample_seed), "ref_stats_sha256": file_sha256(args.ref_stats),
                      "inception_weights": str(args.inception_weights or "default")},
        "search": {"algorithm": "(1+lambda) evolution strategy, one-fifth rule", "offspring": int(args.offspring),
                   "sigma": float(args.sigma), "seed": int(args.seed)},
    }))


def run(args, config, dist, checkpoint, pixels, start, out):
    device = dist.device(args.device)  # a bare cuda is cuda:<LOCAL_RANK>, the GPU of this rank on its node
    labels = class_labels(args.num, config.model.num_classes, args.labels, args.sample_seed)
    tokenizer, model = load_tokenizer_and_model(config, args.model, checkpoint, device, cpu_kernels=args.cpu_kernels)
    if args.compile:
        compile_token_model(model)
    settings = search_settings(args, config, checkpoint, pixels, start, labels, device) if dist.is_main else None
    settings = dist.broadcast(settings)
    log_path = out / LOG_FILE
    records = []
    if dist.is_main:
        if args.overwrite:
            for name in (LOG_FILE, BEST_FILE, START_FILE, RESULT_FILE):
                (out / name).unlink(missing_ok=True)
        old, records = read_log(log_path)
        if old is not None and old != settings:
            diff = fingerprint_diff(old, settings)
            records = ("error", f"{log_path} was written by a search with other settings ({len(diff)} field(s): "
                                f"{'; '.join(diff)}); pass --overwrite to start afresh or choose another --out")
        elif old is None:
            write_log(log_path, settings, [])
    records = dist.broadcast(records)
    if isinstance(records, tuple):
        raise BadInput(records[1])
    evals = [r for r in records if r.get("type") == "eval"]
    heldout_done = {(r["strategy_id"], r["seed"]): r["objective"] for r in records if r.get("type") == "heldout"}
    all_records = list(records)

    def append(record):
        all_records.append(record)
        if dist.is_main:
            write_log(log_path, settings, all_records)

    extractor = load_feature_extractor(args.inception_weights, cache=args.inception_cache or CONVERTED_CACHE,
                                       device=device)
    ref = load_reference_stats(args.ref_stats, dims=FEATURE_DIM)
    objective = FIDObjective(model, tokenizer, labels, ref, extractor, dist, batch_size=args.batch_size,
                             precision=args.precision, pixels=pixels, device=device)
    t0 = time.time()
    logged = LoggedObjective(evals, lambda s: objective(s, args.sample_seed), on_new=append,
                             stop_after=args.stop_after_evals)

    def evaluate(vector, strategy, iteration):
        before = logged.new
        value = logged(vector, strategy, iteration)
        if dist.is_main and logged.new > before:
            print(f"eval {logged.calls - 1} (iteration {iteration}): FID {value:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
        return value

    x0 = encode(strategy_schedule(start))
    settings_es = SearchSettings(iterations=args.iterations, offspring=args.offspring, sigma=args.sigma,
                                 seed=args.seed)
    found = evolution_strategy(x0, evaluate, settings_es, start=start)
    search_s = time.time() - t0
    start_value = float(logged.entries[0]["objective"])
    best, best_value = found["strategy"], float(found["objective"])
    T = settings["steps"]
    if dist.is_main:
        write_strategy_file(out / START_FILE, start, f"Start of a strategy search (T = {T}): search FID "
                                                     f"{start_value:.4f} on {args.num} samples.")
        write_strategy_file(out / BEST_FILE, best, f"Best strategy of a strategy search (T = {T}, "
                                                   f"{found['evaluations']} evaluations): search FID {best_value:.4f} "
                                                   f"on {args.num} samples (start {start_value:.4f}); held-out "
                                                   f"figures in {RESULT_FILE} beside this file.")
    # held-out evaluation on fresh seeds
    t1 = time.time()
    heldout = {"start": [], "best": []}
    seeds = heldout_seeds(args)
    for which, strategy in (("start", start), ("best", best)):
        sid = strategy_id(strategy)
        for seed in seeds:
            if (sid, seed) not in heldout_done:
                value = objective(strategy, seed)
                heldout_done[(sid, seed)] = value
                append({"type": "heldout", "which": which, "strategy_id": sid, "seed": seed, "objective": value})
            heldout[which].append(float(heldout_done[(sid, seed)]))
    result = summarise(start_value, best_value, heldout, seeds, found, args, search_s, time.time() - t1, dist.world)
    if dist.is_main:
        atomic_write_json(out / RESULT_FILE, result)
        print(result["summary"])
        log_search(args.log_with, out, logged.entries[:logged.calls], result)  # after result.json is written
    dist.barrier()
    return result


def log_search(kind: str, out, evals: list, result: dict):
    """--log-with: search/fid of every evaluated candidate and search/best_fid (the best so far) with the
    candidate's index as step; at the last index, the held-out mean FIDs of the start and the best and their
    paired difference (steps only grow, as W&B asks)."""
    rows, best = [], math.inf
    for r in evals:
        best = min(best, r["objective"])
        rows.append((r["eval"], {"search/fid": r["objective"], "search/best_fid": best}))
    h = result["heldout"]
    final = {f"heldout/{k}": h[k] for k in ("start_mean", "best_mean", "paired_difference_mean") if h[k] is not None}
    tracking.log_run(kind, out, "strategy_search", rows + [(len(evals) - 1, final)])


def _mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return (float(v.mean()) if v.size else None, float(v.std(ddof=1)) if v.size > 1 else None)


def summarise(start_value, best_value, heldout, seeds, found, args, search_s, heldout_s, world) -> dict:
    """result.json: search objective and held-out FIDs of the start and the best, and what they say."""
    s_mean, s_std = _mean_std(heldout["start"])
    b_mean, b_std = _mean_std(heldout["best"])
    diff = [b - s for b, s in zip(heldout["best"], heldout["start"])]
    d_mean, d_std = _mean_std(diff)
    same = found["strategy"] == found.get("start")
    if not seeds:
        verdict = "no held-out seeds: nothing to compare"
    elif same:
        verdict = "the search found nothing better than the start on its own seeds"
    elif d_std is not None and d_mean < 0 and -d_mean > 2 * d_std / math.sqrt(len(diff)):
        verdict = "the best beats the start on held-out seeds beyond the seed-to-seed spread (paired, 2 s.e.)"
    elif d_mean < 0:
        verdict = "the best is lower on held-out seeds on average, but within the seed-to-seed spread"
    else:
        verdict = "the best does not beat the start on held-out seeds (the search gain was over-fitting to its seeds)"
    fmt = lambda m, s: "n/a" if m is None else (f"{m:.3f}" + (f" +- {s:.3f}" if s is not None else ""))  # noqa: E731
    summary = (f"search ({found['evaluations']} evaluations, N={args.num}, seed {args.sample_seed}): start FID "
               f"{start_value:.3f}, best {best_value:.3f}; held-out over seeds {seeds}: start {fmt(s_mean, s_std)}, "
               f"best {fmt(b_mean, b_std)}, best - start {fmt(d_mean, d_std)}; {verdict}")
    return {"search": {"start_fid": start_value, "best_fid": best_value, "evaluations": found["evaluations"],
                       "final_sigma": found["sigma"], "num_samples": args.num, "sample_seed": args.sample_seed},
            "heldout": {"seeds": seeds, "start_fid": heldout["start"], "best_fid": heldout["best"],
                        "start_mean": s_mean, "start_std": s_std, "best_mean": b_mean, "best_std": b_std,
                        "paired_difference_mean": d_mean, "paired_difference_std": d_std},
            "verdict": verdict, "summary": summary,
            "seconds": {"search_this_run": round(search_s, 2), "heldout_this_run": round(heldout_s, 2)},
            "processes": world, "best_strategy": found["strategy"], "files": {"best": BEST_FILE, "start": START_FILE}}


if __name__ == "__main__":
    run_main(main)
