"""The CPU demo's drivers: the repo's real entry points run as subprocesses, each stage timed, then the report.

`run_demo` (make demo): data -> tokens (train and held-out) -> graphs -> training of the head-only control and
of KA-MIG on the frozen demo backbone -> held-out masked-token NLL of the backbone, the control and KA-MIG ->
samples of each (generate_npz.py) -> FID -> grids, figures, metrics.json, summary.txt.
`build_assets` (make demo-assets): data -> tokenizer training -> tokens -> backbone pretraining -> held-out
curve of the backbone -> FID reference features -> demo/assets/<source>/.
`run_models` is the part both the demo and the ablation (demo/ablation.py) share: train, evaluate and sample
a list of `ModelSpec`s. Every stage is a subprocess `python <script> --config <file> <overrides>`; its output
is shown live and saved under <out>/logs/.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from demo.fashion_mnist import locate_idx_folder
from libs.atomic_io import atomic_write, atomic_write_json
from libs.checkpoint import file_sha256
from libs.config import resolve_config, split_overrides
from libs.errors import BadInput, MissingInput, UserError, one_line
from libs.models.factory import backbone_of, model_kind

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILE = "vqgan_demo.safetensors"  # its training report is TOKENIZER_FILE + ".json"
BACKBONE_FILE = "autonat_demo.safetensors"  # config.demo.backbone_file of the AutoNAT demos
MANIFEST_FILE = "manifest.json"
# what run_demo writes into its output folder (removed at the start of a run; nothing else is touched)
DEMO_OUTPUTS = ("logs", "tokens", "graphs", "graphs_shuffled", "runs", "samples", "models.json", "nll.npz",
                "fid.json", "grid_backbone.png", "grid_control.png", "grid_ka_mig.png", "grid_shuffled.png",
                "comparison.png", "curves.png", "metrics.json", "summary.txt",
                "ka_mig", "grid_runs", "fid_ka_mig", "fid_backbone", "fid_ref_val.npz")  # the last five: older demos
WORK_TOKENIZER = "tokenizer.safetensors"  # the tokenizer build_assets trains in its work folder
ASSET_OUTPUTS = ("logs", "tokens", "backbone", WORK_TOKENIZER, WORK_TOKENIZER + ".json", "curve.csv",
                 "reference.npz", "tokenizer.pth", "tokenizer.pth.json")  # the last two: older work folders
GRAPHS = ("co", "sim", "incompat")
# --dataset of the demo scripts -> config.demo.source
DATASETS = {"fashion_mnist": "fashion_mnist", "fashion": "fashion_mnist", "synthetic": "synthetic"}
GRAPH_SYMBOL = {"co": "G_co", "sim": "G_s", "incompat": "G_p"}


class StageFailed(RuntimeError):
    """A pipeline stage exited with a non-zero status (`status`; 2 = the stage rejected its input)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison, all made from the same frozen backbone.

    trained False: the backbone as is. trained True with no graphs: the head-only control (a KA-MIG with every
    graph switched off, so only `mlm_layer` trains). Otherwise KA-MIG with `graphs` on, encoded by `gnn`;
    `shuffled` uses graphs whose token ids were permuted (same structure, knowledge destroyed). On the MaskGIT
    host (config.backbone 'maskgit') the same specs build MaskGIT / KA-MaskGIT (`kind`, `shown_label`).
    """
    name: str                   # key and folder name
    label: str                  # shown in tables and figures
    graphs: tuple = ()
    trained: bool = True
    gnn: str = "gcn"
    shuffled: bool = False
    seed: int = None            # training seed (None: the config's)

    def kind(self, config) -> str:
        """The model kind on config's backbone: 'autonat' / 'ka_mig', or 'maskgit' / 'ka_maskgit'."""
        return model_kind(config, graphs=self.trained)

    def shown_label(self, config) -> str:
        """`label`, naming the knowledge-augmented model after config's backbone (KA-MIG or KA-MaskGIT)."""
        return self.label.replace("KA-MIG", host_name(config))

    def overrides(self, graph_dir) -> list:
        """--config.* overrides that make train_graph.py / generate_npz.py build (and train) this model."""
        if not self.trained:
            return []
        return [f"--config.graph.use_{g}={'true' if g in self.graphs else 'false'}" for g in GRAPHS] + \
               [f"--config.graph.gnn={self.gnn}", f"--config.graph.dir={graph_dir}"] + \
               ([f"--config.seed={self.seed}"] if self.seed is not None else [])


BACKBONE = ModelSpec("backbone", "backbone", trained=False)
CONTROL = ModelSpec("control", "control (head only)")
KA_MIG = ModelSpec("ka_mig", "KA-MIG", GRAPHS)
SHUFFLED = ModelSpec("shuffled", "KA-MIG, shuffled graphs", GRAPHS, shuffled=True)
DEMO_MODELS = (BACKBONE, CONTROL, KA_MIG)


def host_name(config) -> str:
    """What the knowledge-augmented model of config's backbone is called: 'KA-MIG' (AutoNAT) or 'KA-MaskGIT'."""
    return "KA-MaskGIT" if backbone_of(config) == "maskgit" else "KA-MIG"


def demo_models(config) -> tuple:
    """The models of `make demo`: backbone, control, KA, and with config.demo.shuffled_graphs the shuffled-graph
    KA (the same modules trained on graphs whose token ids were permuted)."""
    return DEMO_MODELS + ((SHUFFLED,) if config.demo.get("shuffled_graphs", False) else ())


# ----------------------------------------------------------------------------- running stages


def driver_main(name: str, run):
    """Runs a demo driver: a user error (bad flag or input, missing data or weights, or a stage that rejected its
    input with status 2) ends with one line `error: ...` and exit status 2; a failed stage otherwise with
    `<name> failed: ...` and status 1."""
    try:
        return run()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except StageFailed as e:
        if e.status == 2:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(f"{name} failed: {e}")


def parse_demo_args(parser, argv=None):
    """Adds the demo drivers' shared --threads and --log-with flags and parses argv; -> (args,
    --config.<key>=<value> overrides)."""
    from libs.training.tracking import add_log_with_flag
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage (default 0: all cores, or 1 on an already busy machine)")
    add_log_with_flag(parser)
    try:
        overrides, rest = split_overrides(sys.argv[1:] if argv is None else list(argv))
    except BadInput as e:  # a --config.* key without a value
        parser.error(str(e))
    return parser.parse_args(rest), overrides


def busy_cores(interval: float = 0.5):
    """Cores busy right now (Linux /proc/stat, two reads `interval` seconds apart), else the 1-minute load
    average. The load average lags by minutes (right after `make setup` it still counts pip), so it is only the
    fallback."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]  # cpu user nice system idle iowait irq ...
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)
    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return cores * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(requested: int = 0, busy=None) -> tuple:
    """(threads, reason): `requested` if > 0; else all cores, or 1 when other work already keeps half of them
    busy (`busy`: cores in use, default `busy_cores()`).

    On a busy CPU the per-op thread hand-off of a second torch thread costs more than it gains for these
    small models (we measured 6x slower tokenizer steps with 2 threads than with 1 at load ~5 on 2 cores).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        return requested, "as asked (--threads)"
    busy = busy_cores() if busy is None else busy
    if busy >= cores / 2:
        return 1, f"auto: {busy:.1f} of {cores} cores busy with other work, so 1 thread per stage"
    return cores, f"auto: {busy:.1f} of {cores} cores busy with other work"


class Runner:
    """Runs stages as subprocesses in the repo root, tees their output to the terminal and a log, times them."""

    def __init__(self, log_dir: Path, threads: int, total_stages: int):
        self.log_dir = Path(log_dir)
        self.threads = threads
        self.total = total_stages
        self.seconds = {}
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        PYTHONUNBUFFERED="1")

    def run(self, name: str, args: list, what: str):
        """Runs `python <args>`; raises StageFailed on a non-zero exit. Returns the wall seconds."""
        n = len(self.seconds) + 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{n:02d}_{name}.log"
        shown = " ".join(_quote(a) for a in ["python", *args])
        print(f"\n=== [{n}/{self.total}] {name}: {what}\n$ {shown}", flush=True)
        t0 = time.time()
        with open(log_path, "wb") as log:
            log.write(f"$ {shown}\n".encode())
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                fd = proc.stdout.fileno()
                while True:
                    chunk = os.read(fd, 4096)  # raw bytes: keeps the progress bars' carriage returns
                    if not chunk:
                        break
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                    log.write(chunk)
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        seconds = time.time() - t0
        self.seconds[name] = round(seconds, 2)
        if rc != 0:
            tail = _last_error_line(log_path)
            raise StageFailed(f"stage '{name}' failed with exit status {rc} after {seconds:.0f} s"
                              f"{f' ({tail})' if tail else ''}; its output is in {log_path}", status=rc)
        print(f"--- {name} done in {seconds:.1f} s", flush=True)
        return seconds

    def timed(self, name: str, fn, *args, **kwargs):
        """Runs fn in this process as a stage of its own (timed like the subprocesses)."""
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t0, 2)
        return result


def _last_error_line(log_path: Path) -> str:
    """The last line starting with 'error:' in a stage log (the one-line user errors of the entry scripts)."""
    try:
        lines = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    return errors[-1][:300] if errors else ""


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=./:,+" for c in arg) else repr(arg)


def resolve(path) -> Path:
    """A user path relative to the current directory; a config path relative to the repo root."""
    path = Path(path)
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def shown_path(path) -> str:
    """`path` relative to the repo root when inside it (what manifests record), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def config_path(path) -> Path:
    """A config file given relative to the current directory or to the repo root, made absolute."""
    path = Path(path)
    if path.is_absolute() or path.is_file():
        return path.resolve()
    return repo_path(path)


def repo_path(path) -> Path:
    """A config path (relative to the repo root) made absolute."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def load_demo_config(config_file, overrides):
    """The driver's own view of the config, with the same `--config.x=v` overrides the stages get, checked like
    every entry script's (libs.config.resolve_config): MissingInput, or BadInput naming every bad value."""
    return resolve_config(config_file, overrides)


def clean_outputs(out: Path, names):
    """Removes what an earlier run of this driver wrote into `out` (only the known names)."""
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def copy_atomic(src: Path, dst: Path):
    """Copies a file so that `dst` is never half written."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_json(path: Path, obj):
    """Atomic indented JSON (keys in the order given)."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


def read_train_log(path: Path) -> list:
    """Rows of the trainer's log.csv as dicts of floats."""
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def asset_names(d) -> dict:
    """Names of the files one backbone has in demo.assets (d: config.demo), all named after d.backbone_file:
    weights, training log, held-out curve (.csv and .png) and manifest (the AutoNAT demo's is manifest.json).
    The tokenizer and the FID reference features are shared by every backbone of a data set."""
    backbone = d.get("backbone_file", BACKBONE_FILE)
    stem = backbone.rsplit(".", 1)[0]
    return {"backbone": backbone, "log": f"{stem}_log.csv", "curve": f"{stem}_heldout_curve",
            "manifest": MANIFEST_FILE if backbone == BACKBONE_FILE else f"{stem}_manifest.json"}


# ----------------------------------------------------------------------------- shared stages


def data_stage(runner, config_file, cfg_overrides, data_root, fashion_mnist=None, what=""):
    """demo/make_data.py: the train and held-out ImageFolder trees."""
    extra = ["--fashion-mnist", str(fashion_mnist)] if fashion_mnist else []
    runner.run("data", ["-m", "demo.make_data", "--config", str(config_file), *cfg_overrides, "--out", str(data_root),
                        *extra], what)


def token_stage(runner, name, common, data_root, split, out, what, overwrite=True):
    """extract_imagenet_feature.py on one split, without flips (see configs/demo_fashion.py). Without
    `overwrite` a finished identical dataset is kept (the script checks files and tokenizer)."""
    runner.run(name, ["extract_imagenet_feature.py", "--path", str(data_root), "--split", split, "--out", str(out),
                      "--no-flip", "--workers", "0", "--device", "cpu", "--batch-size", "250",
                      *(["--overwrite"] if overwrite else []), *common], what)


def run_models(runner, config, config_file, common, specs, out, p, threads, graph_dirs=None):
    """Trains every trained spec, evaluates the held-out NLL of all, samples each, computes FID.

    Writes <out>/runs/<name>/ (training runs), <out>/models.json, <out>/nll.npz, <out>/samples/<name>/ and
    <out>/fid.json. `graph_dirs`: spec name -> graph folder (default p['graphs']). Returns models.json's list.
    """
    d = config.demo
    graph_dirs = graph_dirs or {}
    entries = []
    for spec in specs:
        gdir = graph_dirs.get(spec.name, p["graphs"])
        ckpt = out / "runs" / spec.name / "model_ema.safetensors" if spec.trained else p["backbone"]
        entries.append({"name": spec.name, "label": spec.shown_label(config), "kind": spec.kind(config),
                        "checkpoint": str(ckpt),
                        "overrides": spec.overrides(gdir), "spec": asdict(spec)})
        if spec.trained:
            graphs = "+".join(GRAPH_SYMBOL[g] for g in spec.graphs) or "no graph (only mlm_layer trains)"
            runner.run(f"train_{spec.name}", ["train_graph.py", *common, f"--config.output_dir={out / 'runs'}",
                                              f"--config.run_name={spec.name}", *spec.overrides(gdir)],
                       f"{spec.shown_label(config)}: {graphs}{' (shuffled)' if spec.shuffled else ''}"
                       f"{' with GAT' if spec.gnn == 'gat' else ''} on the frozen backbone, "
                       f"{config.train.n_steps} steps of {config.train.batch_size}")
    write_json(out / "models.json", entries)
    runner.run("nll", ["-m", "demo.evaluate", "nll", *common, "--models", str(out / "models.json"),
                       "--tokens", str(p["heldout_tokens"]), "--out", str(out / "nll.npz")],
               f"held-out masked-token NLL of {len(specs)} models at mask ratios {tuple(d.nll_ratios)}")
    for e in entries:
        runner.run(f"samples_{e['name']}", ["generate_npz.py", "--model", e["kind"], "--checkpoint", e["checkpoint"],
                                            "--num-samples", str(d.fid_samples), "--no-fid", "--labels", "balanced",
                                            "--out", str(out / "samples" / e["name"]), "--device", "cpu",
                                            "--batch-size", str(d.sample_batch_size), "--seed", str(d.sample_seed),
                                            *common, *e["overrides"]],
                   f"{d.fid_samples} samples of {e['label']} (seed {d.sample_seed}, balanced labels)")
    runner.run("fid", ["-m", "demo.evaluate", "fid", *common, "--models", str(out / "models.json"),
                       "--samples", str(out / "samples"), "--heldout", str(p["heldout_images"]),
                       "--out", str(out / "fid.json"),
                       *(["--reference-features", str(p["reference"])] if p.get("reference") else [])],
               f"Inception features of {len(entries)} x {d.fid_samples} samples; FID and precision/recall against "
               f"{d.fid_reference_per_class * config.model.num_classes} held-out images")
    return entries


# ----------------------------------------------------------------------------- make demo


def demo_paths(out: Path, assets: Path, data_root: Path, d) -> dict:
    """Every file and folder run_demo reads or writes (d: config.demo)."""
    return {"tokens": out / "tokens" / "train", "heldout_tokens": out / "tokens" / d.heldout_split,
            "heldout_images": data_root / d.heldout_split, "graphs": out / "graphs", "logs": out / "logs",
            "tokenizer": assets / TOKENIZER_FILE, "backbone": assets / asset_names(d)["backbone"],
            "reference": assets / d.reference_features if d.reference_features else None}


def check_data_source(config, fashion_mnist=None):
    """Fails (FashionMNISTUnavailable, one line listing the ways to provide it) before anything is written or
    removed when the demo's Fashion-MNIST files can be neither found nor fetched; fetches them when allowed."""
    d = config.demo
    if d.source == "fashion_mnist":
        locate_idx_folder(fashion_mnist or d.fashion_mnist or None, cache=repo_path(d.fashion_mnist_cache))


def assets_command(config, key: str = "backbone") -> str:
    """The `make demo-assets` command(s) that rebuild a demo config's weight `key` ('tokenizer' or 'backbone'):
    the Makefile's DATA and BACKBONE when they are not its defaults (fashion_mnist, autonat); a tokenizer that
    the backbone reuses (demo.train_tokenizer false) is the AutoNAT build's, made first."""
    data = ["DATA=synthetic"] if config.demo.source != "fashion_mnist" else []
    backbone = backbone_of(config)
    own = " ".join(["make demo-assets", *data, *([f"BACKBONE={backbone}"] if backbone != "autonat" else [])])
    if key == "tokenizer" and not config.demo.get("train_tokenizer", True):
        return f"`{' '.join(['make demo-assets', *data])}` (the data set's tokenizer), then `{own}`"
    return f"`{own}`"


def prepare_run(config_file, overrides, out, data_root, assets, outputs, fashion_mnist=None) -> tuple:
    """What `make demo` and `make ablation` do first: load the config, check the demo weights and the data
    source, then clear `outputs` of earlier runs in `out` (so a bad flag loses nothing).
    -> (config_file, config, out, data_root, paths, cfg_overrides, common flags)."""
    config_file = config_path(config_file)
    config = load_demo_config(config_file, overrides)
    d = config.demo
    out = resolve(out)
    data_root = resolve(data_root) if data_root else repo_path(d.data_root)
    assets = resolve(assets) if assets else repo_path(d.assets)
    p = demo_paths(out, assets, data_root, d)
    for key in ("tokenizer", "backbone"):
        if not p[key].is_file():
            raise MissingInput(f"demo weights not found: {p[key]} (rebuild them with {assets_command(config, key)})")
    check_data_source(config, fashion_mnist)
    clean_outputs(out, outputs)
    out.mkdir(parents=True, exist_ok=True)
    cfg_overrides = [f"--config.{k}={v}" for k, v in overrides]
    common = ["--config", str(config_file), *cfg_overrides, f"--config.data.path={p['tokens']}",
              f"--config.tokenizer.checkpoint={p['tokenizer']}", f"--config.train.init_checkpoint={p['backbone']}",
              f"--config.graph.dir={p['graphs']}"]
    return config_file, config, out, data_root, p, cfg_overrides, common


def prepare_tokens_and_graphs(runner, config, config_file, cfg_overrides, common, data_root, p, fashion_mnist,
                              n_threads):
    """The stages before any model: images -> train and held-out tokens -> the three graphs."""
    d = config.demo
    train_n = "all" if d.train_per_class <= 0 else d.train_per_class
    data_stage(runner, config_file, cfg_overrides, data_root, fashion_mnist,
               f"{d.source}: {config.model.num_classes} classes x ({train_n} train + {d.heldout_per_class} held-out "
               f"'{d.heldout_split}') images")
    token_stage(runner, "tokens_train", common, data_root, "train", p["tokens"], "tokenize the train images")
    token_stage(runner, "tokens_heldout", common, data_root, d.heldout_split, p["heldout_tokens"],
                f"tokenize the held-out '{d.heldout_split}' images (NLL)")
    runner.run("graphs", ["-m", "graph_construction.build_graphs", "--tokens", str(p["tokens"]),
                          "--num-threads", str(n_threads), *common], "G_co, G_s and G_p from the train tokens")


def run_demo(config_file, overrides, out, data_root=None, assets=None, threads=0, fashion_mnist=None) -> dict:
    """`make demo`: the three models on the committed demo weights; returns the metrics dict."""
    from demo import report

    t_start = time.time()
    config_file, config, out, data_root, p, cfg_overrides, common = prepare_run(
        config_file, overrides, out, data_root, assets, DEMO_OUTPUTS, fashion_mnist)
    n_threads, why = pick_threads(threads)
    specs = demo_models(config)
    shuffled = SHUFFLED in specs
    runner = Runner(p["logs"], n_threads, total_stages=6 + shuffled + 2 * len(specs))
    print(f"{host_name(config)} CPU demo ({config.demo.source}) -> {out}\n  config {config_file}; data {data_root}; "
          f"weights {p['backbone'].parent}; threads {n_threads} ({why})", flush=True)
    prepare_tokens_and_graphs(runner, config, config_file, cfg_overrides, common, data_root, p, fashion_mnist,
                              n_threads)
    graph_dirs = {}
    if shuffled:
        from demo.ablation import shuffle_graphs
        graph_dirs["shuffled"] = out / "graphs_shuffled"
        runner.timed("shuffle_graphs", shuffle_graphs, p["graphs"], graph_dirs["shuffled"],
                     config.model.codebook_size, seed=0)
    entries = run_models(runner, config, config_file, common, specs, out, p, n_threads, graph_dirs)
    return report.demo_report(config, config_file, overrides, out, p, entries, runner, n_threads, why, t_start)


# ----------------------------------------------------------------------------- make demo-assets


def convert_work_tokenizer(work: Path):
    """A work folder of an older `make demo-assets` holds the tokenizer as the torch file tokenizer.pth: it is
    converted to WORK_TOKENIZER (the same tensors, its config in the metadata) so that --resume reuses it."""
    old, new = work / "tokenizer.pth", work / WORK_TOKENIZER
    if old.is_file() and not new.is_file():
        from tools.to_safetensors import convert
        if Path(str(old) + ".json").is_file():
            copy_atomic(Path(str(old) + ".json"), Path(str(new) + ".json"))
        convert(old, new)


def tokenizer_report(path: Path):
    """The training report demo/train_tokenizer.py wrote next to the tokenizer, or None when it is absent."""
    return json.loads(path.read_text())["report"] if path.is_file() else None


def build_assets(config_file, backbone_config_file, overrides, work, assets, data_root=None, threads=0,
                 fashion_mnist=None, resume=False) -> dict:
    """`make demo-assets`: data -> tokenizer -> tokens -> backbone -> held-out curve -> reference features.

    resume: keep the work folder of an earlier run: its tokenizer and tokens are reused, and train_graph.py
    resumes the backbone from its newest checkpoint (train.n_steps may have grown); the curve and the reference
    features are made again. The manifest then lists every segment's stage times.
    """
    from demo import report

    t_start = time.time()
    config_file, backbone_config_file = config_path(config_file), config_path(backbone_config_file)
    config = load_demo_config(config_file, overrides)
    backbone_cfg = load_demo_config(backbone_config_file, overrides)
    d = config.demo
    work, assets = resolve(work), resolve(assets)
    data_root = resolve(data_root) if data_root else repo_path(d.data_root + "_assets")
    names = asset_names(d)
    train_tokenizer = bool(d.get("train_tokenizer", True))
    previous = None
    if resume and (work / "segments.json").is_file():
        previous = json.loads((work / "segments.json").read_text())
    check_data_source(config, fashion_mnist)
    if not resume:
        clean_outputs(work, ASSET_OUTPUTS + ("segments.json",))
    work.mkdir(parents=True, exist_ok=True)
    n_threads, why = pick_threads(threads)
    # without train_tokenizer the committed tokenizer is reused, and with it the reference features (of images)
    curve, reference = bool(d.heldout_curve), bool(d.reference_features) and train_tokenizer
    runner = Runner(work / "logs", n_threads, total_stages=5 + train_tokenizer + curve + reference)
    tokenizer = work / WORK_TOKENIZER if train_tokenizer else assets / TOKENIZER_FILE
    tokens, heldout_tokens = work / "tokens" / "train", work / "tokens" / "heldout"
    if not train_tokenizer and not tokenizer.is_file():
        raise MissingInput(f"demo tokenizer not found: {tokenizer} (config.demo.train_tokenizer is false: this "
                           f"backbone reuses the data set's tokenizer; build it first with `make demo-assets`)")
    print(f"demo assets ({d.source}) -> {assets} (work folder {work}); threads {n_threads} ({why})", flush=True)
    cfg_overrides = [f"--config.{k}={v}" for k, v in overrides]
    data_overrides = [*cfg_overrides, f"--config.demo.train_per_class={d.assets_train_per_class}"]
    train_n = "all" if d.assets_train_per_class <= 0 else d.assets_train_per_class
    data_stage(runner, config_file, data_overrides, data_root, fashion_mnist,
               f"{d.source}: {train_n} train images per class + {d.heldout_per_class} held-out per class")
    if train_tokenizer and resume:
        convert_work_tokenizer(work)
    if train_tokenizer and not (resume and tokenizer.is_file()):
        runner.run("tokenizer", ["-m", "demo.train_tokenizer", "--config", str(config_file), *cfg_overrides,
                                 "--data", str(data_root / "train"), "--val", str(data_root / d.heldout_split),
                                 "--out", str(tokenizer)],
                   f"train the demo VQGAN, {config.tokenizer_train.steps} steps")
    common = ["--config", str(config_file), *cfg_overrides, f"--config.tokenizer.checkpoint={tokenizer}"]
    token_stage(runner, "tokens_train", common, data_root, "train", tokens, "tokenize the train split",
                overwrite=not resume)
    token_stage(runner, "tokens_heldout", common, data_root, d.heldout_split, heldout_tokens,
                f"tokenize the held-out '{d.heldout_split}' split", overwrite=not resume)
    runner.run("backbone", ["train_graph.py", "--config", str(backbone_config_file), *cfg_overrides,
                            f"--config.output_dir={work}", "--config.run_name=backbone",
                            f"--config.data.path={tokens}", f"--config.tokenizer.checkpoint={tokenizer}"],
               f"pretrain the demo {backbone_of(backbone_cfg)} backbone (train_graph.py, mode pretrain), "
               f"{backbone_cfg.train.n_steps} "
               f"steps of {backbone_cfg.train.batch_size}")
    if curve:
        runner.run("heldout_curve", ["-m", "demo.evaluate", "curve", "--config", str(backbone_config_file),
                                     *cfg_overrides, "--run", str(work / "backbone"), "--tokens", str(heldout_tokens),
                                     "--out", str(work / "curve.csv")],
                   "held-out masked-token NLL of every saved backbone checkpoint (raw and EMA weights)")
    if reference:
        runner.run("fid_reference", ["-m", "demo.evaluate", "reference", *common,
                                     "--heldout", str(data_root / d.heldout_split),
                                     "--out", str(work / "reference.npz")],
                   f"Inception features of the {d.fid_reference_per_class * config.model.num_classes} held-out "
                   f"FID reference images")
    assets.mkdir(parents=True, exist_ok=True)
    if train_tokenizer:
        copy_atomic(tokenizer, assets / TOKENIZER_FILE)
        copy_atomic(Path(str(tokenizer) + ".json"), assets / (TOKENIZER_FILE + ".json"))
    copy_atomic(work / "backbone" / "model_ema.safetensors", assets / names["backbone"])
    copy_atomic(work / "backbone" / "log.csv", assets / names["log"])
    files = [TOKENIZER_FILE, names["backbone"]]
    curve_csv = assets / f"{names['curve']}.csv"
    if curve:
        copy_atomic(work / "curve.csv", curve_csv)
        report.curve_figure(curve_csv, assets / names["log"], assets / f"{names['curve']}.png")
    if reference:
        copy_atomic(work / "reference.npz", assets / d.reference_features)
        files.append(d.reference_features)
    log = read_train_log(work / "backbone" / "log.csv")
    manifest = {
        "recipe": "make demo-assets (python -m demo.make_assets): demo/make_data.py -> "
                  + ("demo/train_tokenizer.py" if train_tokenizer else f"the committed {TOKENIZER_FILE}")
                  + " -> extract_imagenet_feature.py -> train_graph.py (mode pretrain)"
                  + (" -> demo/evaluate.py curve" if curve else "")
                  + (" -> demo/evaluate.py reference" if reference else ""),
        "source": d.source,
        "config": shown_path(config_file), "backbone_config": shown_path(backbone_config_file),
        "overrides": cfg_overrides,
        "files": {name: {"bytes": (assets / name).stat().st_size, "sha256": file_sha256(assets / name)}
                  for name in files},
        "tokenizer": tokenizer_report(assets / (TOKENIZER_FILE + ".json")),
        "backbone": {"steps": int(backbone_cfg.train.n_steps), "batch_size": int(backbone_cfg.train.batch_size),
                     **report.loss_start_end(log)},
        "stage_seconds": dict(runner.seconds), "total_seconds": round(time.time() - t_start, 2),
        "threads": n_threads, "threads_reason": why,
    }
    segments = (previous or []) + [{"stage_seconds": dict(runner.seconds), "total_seconds": manifest["total_seconds"],
                                    "threads": n_threads, "backbone_steps": int(backbone_cfg.train.n_steps)}]
    write_json(work / "segments.json", segments)
    if len(segments) > 1:
        manifest["segments"] = segments
        manifest["total_seconds_all_segments"] = round(sum(seg["total_seconds"] for seg in segments), 2)
    if curve:
        manifest["heldout_curve"] = report.read_curve(curve_csv)[-1]
    write_json(assets / names["manifest"], manifest)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"\nwrote {assets}: {', '.join(manifest['files'])} ({total / 2 ** 20:.1f} MiB) in "
          f"{manifest['total_seconds']:.0f} s", flush=True)
    return manifest
