"""`make ablation`: which knowledge graphs help, on the demo's data and frozen backbone.

    python -m demo.ablation                       # Fashion-MNIST (configs/demo_fashion.py) -> output/ablation/
    python -m demo.ablation --dataset synthetic   # procedural images
    python -m demo.ablation --no-write-benchmarks # keep benchmarks/ABLATION.md and ablation.csv as they are
    python -m demo.ablation --report-only         # rewrite the tables of a finished run (no stage runs again)
    python -m demo.ablation --log-with tensorboard  # also the numbers and the table to <out>/tb/ (or wandb)
Models, all trained exactly like the demo's KA-MIG (same steps, batch, learning rate and seed) on the same frozen
backbone: the backbone as is; the head-only control (no graph); KA-MIG with each of the seven non-empty subsets of
{G_co, G_s, G_p} (GCN encoder); all three graphs with the GAT encoder; all three graphs with shuffled token ids
(same graph structure and sizes, the knowledge destroyed: a control for what the graphs know). Each gets the
demo's held-out NLL (with intervals and paired differences against the control and the backbone) and FID. The
diagnostics check that the graph terms are alive after training: their size relative to the hidden state before
every block, and the gradient reaching every graph module. Writes <out>/ablation.json, and
benchmarks/ABLATION.md + benchmarks/ablation.csv.
"""
import argparse
import csv
import datetime
import io
import itertools
import json
import os
import platform
import time

import numpy as np
import torch

from demo.pipeline import (BACKBONE, CONTROL, DATASETS, GRAPH_SYMBOL, GRAPHS, KA_MIG, REPO_ROOT, ModelSpec, Runner,
                           config_path, driver_main, load_demo_config, parse_demo_args, pick_threads, prepare_run,
                           prepare_tokens_and_graphs, read_train_log, resolve, run_models, write_json)
from demo.report import nll_summary, num, tracker_scalars
from libs.cli import ArgumentParser
from libs.atomic_io import atomic_write_text
from libs.errors import MissingInput
from libs.training.tracking import check_log_with, log_run
from libs.graphs.files import (graph_paths, load_edge_graph, load_incompatibility, read_meta, save_edge_graph,
                               save_incompatibility)
from libs.graphs.recipes import unpack_occurrence_torch
from libs.models.factory import GRAPH_KINDS, backbone_of

CONFIGS = {("fashion_mnist", "autonat"): "configs/demo_fashion.py",
           ("fashion_mnist", "maskgit"): "configs/demo_fashion_maskgit.py", ("synthetic", "autonat"): "configs/demo.py"}
ABLATION_OUTPUTS = ("logs", "tokens", "graphs", "graphs_shuffled", "runs", "samples", "models.json", "nll.npz",
                    "fid.json", "diagnostics.json", "ablation.json")


def subset_name(graphs) -> str:
    return "+".join(graphs)


def ablation_models() -> tuple:
    """backbone, control, the seven graph subsets (GCN; all three = the demo's KA-MIG), GAT, shuffled."""
    subsets = [c for k in (1, 2, 3) for c in itertools.combinations(GRAPHS, k)]
    specs = [BACKBONE, CONTROL]
    for graphs in subsets:
        if graphs == GRAPHS:
            specs.append(KA_MIG)
        else:
            specs.append(ModelSpec(subset_name(graphs), " + ".join(GRAPH_SYMBOL[g] for g in graphs), graphs))
    specs.append(ModelSpec("gat", "all three, GAT encoder", GRAPHS, gnn="gat"))
    specs.append(ModelSpec("shuffled", "all three, shuffled ids", GRAPHS, shuffled=True))
    # a second training seed of the control and of KA-MIG: how much the training randomness alone moves the numbers
    specs.append(ModelSpec("control_seed1", "control, training seed 1", (), seed=1))
    specs.append(ModelSpec("ka_mig_seed1", "KA-MIG, training seed 1", GRAPHS, seed=1))
    return tuple(specs)


# ----------------------------------------------------------------------------- shuffled graphs


def shuffle_graphs(src_dir, dst_dir, codebook_size: int, seed: int = 0) -> dict:
    """Copies the three graphs with token ids permuted by one seeded permutation pi (numpy Generator(seed)):
    edge (u, v) becomes (pi[u], pi[v]) with the same weight, and G_p's token axis is permuted the same way, so
    degrees, weights and incompatible-set sizes are kept while which token they belong to is random."""
    src, dst = graph_paths(src_dir), graph_paths(dst_dir)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(codebook_size))
    for name in ("co", "sim"):
        index, weight, num_nodes = load_edge_graph(src[name], dtype=None)
        meta = {**read_meta(src[name]), "shuffled": {"seed": seed, "permutation": "numpy default_rng(seed)"}}
        save_edge_graph(dst[name], perm[index], weight, meta={**meta, "num_nodes": num_nodes})
    g = load_incompatibility(src["incompat"])
    K = g["codebook_size"]
    occurs = unpack_occurrence_torch(g["packed"], K)  # [C,L,K] bool
    moved = torch.empty_like(occurs)
    moved[..., perm] = occurs  # token t's column goes to pi[t]
    bits = np.packbits(moved.numpy(), axis=-1, bitorder="little")
    save_incompatibility(dst["incompat"], bits, meta={**g["meta"], "codebook_size": K,
                                                      "shuffled": {"seed": seed}})
    return {"permutation_head": perm[:8].tolist(), "seed": seed}


# ----------------------------------------------------------------------------- tables


def ablation_rows(entries, nll: dict, fid: dict, diag: dict, seconds: dict) -> list:
    rows = []
    for e in entries:
        name, spec = e["name"], e["spec"]
        m = nll["models"][name]["overall"]
        row = {"model": name, "label": e["label"],
               "graphs": ("+".join(GRAPH_SYMBOL[g] for g in spec["graphs"]) or "none (head only)") if spec["trained"]
               else "(frozen backbone)",
               "encoder": spec["gnn"] if spec["graphs"] else "", "shuffled": spec["shuffled"],
               "seed": spec.get("seed"),
               "nll": m["mean"], "nll_lo": m["lo"], "nll_hi": m["hi"]}
        for ref in ("control", "backbone"):
            dif = nll["differences"].get(f"{name}-{ref}", {}).get("overall") or {}
            row.update({f"nll_minus_{ref}": dif.get("mean"), f"nll_minus_{ref}_lo": dif.get("lo"),
                        f"nll_minus_{ref}_hi": dif.get("hi")})
        f = fid["models"][name]
        row.update({"fid": f["fid"], "fid_lo": f["lo"], "fid_hi": f["hi"], "precision": f["precision"],
                    "recall": f["recall"]})
        for ref in ("control", "backbone"):
            dif = fid["differences"].get(f"{name}-{ref}") or {}
            row.update({f"fid_minus_{ref}": dif.get("diff"), f"fid_minus_{ref}_lo": dif.get("lo"),
                        f"fid_minus_{ref}_hi": dif.get("hi")})
        dg = diag.get(name)
        row["term_over_hidden_mean"] = dg["term_over_hidden_mean"] if dg else None
        row["train_seconds"] = seconds.get(f"train_{name}")
        rows.append(row)
    return rows


def csv_text(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def markdown(rows, nll, fid, diag, meta) -> str:
    level = int(round(100 * nll["level"]))

    def ci(row, key, digits=4, signed=True):
        if row.get(key) is None:
            return "-"
        return (f"{num(row[key], digits, signed)} [{num(row[key + '_lo'], digits, signed)}, "
                f"{num(row[key + '_hi'], digits, signed)}]")

    def star(row, key):
        return " **" if row.get(key + "_hi") is not None and row[key + "_hi"] < 0 else ""

    lines = [
        "# Graph ablation on the CPU demo",
        "",
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}` ({meta['wall_minutes']:.0f} minutes "
        f"in all, {meta['threads']} thread(s) per stage). Data: {meta['data']}. Every model is trained from the same "
        f"frozen demo backbone exactly like the demo's KA-MIG: {meta['train']}.",
        "",
        f"NLL: held-out masked-token NLL in nats (lower is better), {nll['n_images']} held-out images, mask ratios "
        f"{', '.join(f'{r:g}' for r in nll['ratios'])} (fixed seeded masks, the same for every model), mean over "
        f"ratios per image; {level}% t intervals over images; differences are per-image paired. FID: "
        f"{fid['n_samples']} samples per model (same labels and seeds) against {fid['n_reference']} held-out images; "
        f"{level}% interval = FID +- {fid['spread']['z']:.2f} SD from {fid['spread']['subsets']} random halves "
        f"(delete-half jackknife; paired for differences). ** = better than the reference model beyond the "
        f"interval.",
        "",
        "| model | graphs | NLL | NLL - control | NLL - backbone | FID | FID - control | FID - backbone | "
        "precision | recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        graphs = (r["graphs"] + (f" ({r['encoder'].upper()})" if r["encoder"] else "")
                  + (" shuffled" if r["shuffled"] else ""))
        lines.append(f"| {r['label']} | {graphs} | {ci(r, 'nll', signed=False)} | {ci(r, 'nll_minus_control')}"
                     f"{star(r, 'nll_minus_control')} | {ci(r, 'nll_minus_backbone')}{star(r, 'nll_minus_backbone')} | "
                     f"{ci(r, 'fid', 2, False)} | {ci(r, 'fid_minus_control', 2)}{star(r, 'fid_minus_control')} | "
                     f"{ci(r, 'fid_minus_backbone', 2)}{star(r, 'fid_minus_backbone')} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} |")
    diffs = nll["differences"]
    if "ka_mig_seed1-control_seed1" in diffs:
        d = diffs["ka_mig_seed1-control_seed1"]["overall"]
        lines += ["", f"The '- control' columns compare every row with the control of training seed 0, the seed-1 "
                      f"rows included (so 'control, training seed 1' shows the seed-to-seed change of the control). "
                      f"Same-seed comparison for seed 1: KA-MIG seed 1 - control seed 1 = {num(d['mean'])} "
                      f"[{num(d['lo'])}, {num(d['hi'])}] nats."]
    lines += ["", "Diagnostics of the trained graph terms (held-out tokens masked at ratio 0.5): relative size "
                  "|term| / |hidden state| of the term added before each block (forward order), and the gradient "
                  "norm of the masked-token loss reaching each graph module.", "",
              "| model | \\|term\\|/\\|h\\| per block | grad G_co GCN | grad G_s GCN | grad G_p conv "
              "| grad fusion convs (+) | grad fusion convs (G_p) |", "|---|---|---|---|---|---|---|"]
    for name, d in diag.items():
        g = d["grad_norm"]
        cell = lambda k: f"{g[k]:.2e}" if k in g else "-"  # noqa: E731
        lines.append(f"| {name} | {', '.join(f'{v:.3g}' for v in d['term_over_hidden_per_block'])} | "
                     f"{cell('co_graph_layer')} | {cell('re_graph_layer')} | {cell('pos_neg_codebook_graph_layer')} | "
                     f"{cell('zero_convs')} | {cell('zero_convs_pos')} |")
    lines += ["", "## Reading", "", meta["reading"], "",
              "Per mask ratio, training logs and every number: `output/ablation/` (`ablation.json`, `nll.npz`, "
              "`fid.json`, `diagnostics.json`); this table in machine form: `benchmarks/ablation.csv`.", ""]
    return "\n".join(lines)


def reading(rows, nll, diag) -> str:
    """A plain statement of what the table shows, generated from the numbers (nothing here is written by hand):
    graph models vs the control, how large the training-seed change of the control is next to that, real vs
    shuffled graphs, trained models vs the frozen backbone, FID, and whether the graph terms are alive."""
    diffs = nll["differences"]

    def span(key):
        d = diffs[key]["overall"]
        return f"{num(d['mean'])} [{num(d['lo'])}, {num(d['hi'])}]"

    graph_rows = [r for r in rows if r["model"] not in ("backbone", "control", "shuffled", "control_seed1",
                                                        "ka_mig_seed1")]
    beat = [r["label"] for r in graph_rows if (r["nll_minus_control_hi"] or 0) < 0]
    worse = [r["label"] for r in graph_rows if (r["nll_minus_control_lo"] or 0) > 0]
    parts = [f"By held-out NLL, {len(beat)} of {len(graph_rows)} graph models beat the head-only control (training "
             f"seed 0) beyond the 95% per-image interval" + (f": {', '.join(beat)}." if beat else ".")]
    if worse:
        parts.append(f"Worse than the control beyond the interval: {', '.join(worse)}.")
    noise_like = False
    if {"control_seed1-control", "ka_mig-control", "ka_mig_seed1-control_seed1"} <= set(diffs):
        c = diffs["control_seed1-control"]["overall"]["mean"]
        gains = [diffs["ka_mig-control"]["overall"]["mean"], diffs["ka_mig_seed1-control_seed1"]["overall"]["mean"]]
        noise_like = abs(c) >= 0.5 * min(abs(g) for g in gains)
        parts.append(f"Those intervals cover held-out images and masks, not training randomness: the control trained "
                     f"with seed 1 differs from the control with seed 0 by {span('control_seed1-control')} nats, "
                     f"while KA-MIG - control is {span('ka_mig-control')} with seed 0 and "
                     f"{span('ka_mig_seed1-control_seed1')} with seed 1; the graph models' gain is "
                     + ("about the size of the control's own seed-to-seed change." if noise_like else
                        "well above the control's own seed-to-seed change."))
    same_as_shuffled = False
    if "ka_mig-shuffled" in diffs:
        d = diffs["ka_mig-shuffled"]["overall"]
        same_as_shuffled = not (d["hi"] < 0)
        parts.append(f"Real against shuffled graphs (same structure and sizes, token ids permuted): KA-MIG - "
                     f"shuffled = {span('ka_mig-shuffled')} nats; "
                     + ("the real graphs are not better beyond the interval." if same_as_shuffled else
                        "the real graphs are better beyond the interval."))
    trained = [r for r in rows if r["model"] != "backbone" and r.get("nll_minus_backbone") is not None]
    if trained and all((r["nll_minus_backbone_lo"] or 0) > 0 for r in trained):
        lo, hi = min(r["nll_minus_backbone"] for r in trained), max(r["nll_minus_backbone"] for r in trained)
        parts.append(f"Every trained model, the control included, has a higher held-out NLL than the frozen backbone "
                     f"as is ({num(lo)} to {num(hi)} nats): the short fine-tuning of the head moves it slightly away "
                     f"from the backbone's own (EMA) head.")
    fid_better = [r["label"] for r in graph_rows if (r["fid_minus_control_hi"] or 0) < 0]
    parts.append("By FID, " + (f"better than the control beyond the interval: {', '.join(fid_better)}."
                               if fid_better else "no graph model is better than the control beyond the interval."))
    if diag:
        sizes = [v for d in diag.values() for v in d["term_over_hidden_per_block"]]
        grads = [g for d in diag.values() for g in d["grad_norm"].values()]
        parts.append(f"The graph terms are alive: after training they are {100 * min(sizes):.1f}% to "
                     f"{100 * max(sizes):.1f}% of the hidden state they are added to (per block), and every graph "
                     f"module receives gradient (norms {min(grads):.1e} to {max(grads):.1e}).")
    if noise_like and same_as_shuffled:
        parts.append("Verdict: at this scale there is no evidence that what the graphs know helps; the small gain "
                     "over the control is matched by shuffled graphs and is the size of training-seed noise.")
    return " ".join(parts)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown model'."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


# ----------------------------------------------------------------------------- driver


def run_ablation(config_file, overrides, out, data_root=None, assets=None, threads=0, fashion_mnist=None,
                 write_benchmarks=True, command="make ablation") -> dict:
    t_start = time.time()
    config_file, config, out, data_root, p, cfg_overrides, common = prepare_run(
        config_file, overrides, out, data_root, assets, ABLATION_OUTPUTS, fashion_mnist)
    d = config.demo
    n_threads, why = pick_threads(threads)
    specs = ablation_models()
    runner = Runner(p["logs"], n_threads, total_stages=7 + 2 * len(specs))
    print(f"KA-MIG graph ablation ({d.source}): {len(specs)} models -> {out}; threads {n_threads} ({why})", flush=True)
    prepare_tokens_and_graphs(runner, config, config_file, cfg_overrides, common, data_root, p, fashion_mnist,
                              n_threads)
    shuffled_dir = out / "graphs_shuffled"
    shuffle_info = runner.timed("shuffle_graphs", shuffle_graphs, p["graphs"], shuffled_dir,
                                config.model.codebook_size, seed=0)
    entries = run_models(runner, config, config_file, common, specs, out, p, n_threads,
                         graph_dirs={"shuffled": shuffled_dir})
    runner.run("diagnostics", ["-m", "demo.evaluate", "diagnostics", *common, "--models", str(out / "models.json"),
                               "--tokens", str(p["heldout_tokens"]), "--out", str(out / "diagnostics.json")],
               "size of the trained graph terms and the gradients reaching every graph module")
    return write_report(out, config, specs, entries, dict(runner.seconds), time.time() - t_start, n_threads, command,
                        shuffle_info, write_benchmarks)


def write_report(out, config, specs, entries, seconds: dict, wall: float, n_threads: int, command: str,
                 shuffle_info: dict, write_benchmarks: bool = True, measured: dict = None) -> dict:
    """ablation.json, and benchmarks/ABLATION.md + ablation.csv, from the files a run left in `out` (models.json,
    nll.npz, fid.json, diagnostics.json). `measured`: date and machine of that run when they are not today's."""
    d = config.demo
    pairs = [(s.name, ref) for s in specs if s.trained for ref in ("control", "backbone") if s.name != ref]
    pairs += [("ka_mig_seed1", "control_seed1"), ("ka_mig", "shuffled"), ("gat", "ka_mig")]
    nll = nll_summary(out / "nll.npz", d.ci_level, pairs=pairs)
    fid = json.loads((out / "fid.json").read_text())
    diag = json.loads((out / "diagnostics.json").read_text())
    rows = ablation_rows(entries, nll, fid, diag, seconds)
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_model()}), torch {torch.__version__}",
            **(measured or {}),
            "command": command, "wall_minutes": wall / 60, "threads": n_threads,
            "data": f"{d.source}, {d.train_per_class} train images per class for the graphs and the training, "
                    f"{d.heldout_per_class} held-out '{d.heldout_split}' images per class",
            "train": f"{config.train.n_steps} steps of {config.train.batch_size}, lr {config.train.lr:g}, warmup "
                     f"{config.train.warmup_steps}, EMA {config.train.ema_rate}, seed {config.seed}"}
    meta["reading"] = reading(rows, nll, diag)
    result = {"meta": meta, "rows": rows, "nll": nll, "fid": fid, "diagnostics": diag, "shuffle": shuffle_info,
              "train_logs": {e["name"]: read_train_log(out / "runs" / e["name"] / "log.csv") for e in entries
                             if e["kind"] in GRAPH_KINDS},
              "stage_seconds": seconds, "total_seconds": round(wall, 2)}
    write_json(out / "ablation.json", result)
    md = markdown(rows, nll, fid, diag, meta)
    if write_benchmarks:
        suffix = "" if backbone_of(config) == "autonat" else f"_{backbone_of(config)}"  # one table per host
        atomic_write_text(REPO_ROOT / "benchmarks" / f"ABLATION{suffix.upper()}.md", md)
        atomic_write_text(REPO_ROOT / "benchmarks" / f"ablation{suffix}.csv", csv_text(rows))
    print("\n" + md, flush=True)
    return result


def report_only(config_file, overrides, out, write_benchmarks=True) -> dict:
    """Rewrites the report of a finished run in `out` from its files (no stage is run again); its date, machine,
    stage times and thread count are kept."""
    config = load_demo_config(config_path(config_file), overrides)
    out = resolve(out)
    try:
        old = json.loads((out / "ablation.json").read_text())
        entries = json.loads((out / "models.json").read_text())
    except FileNotFoundError as e:
        raise MissingInput(f"no finished ablation in {out} ({e.filename} is missing); run `make ablation` "
                           f"first") from e
    names = [e["name"] for e in entries]
    specs = [s for s in ablation_models() if s.name in names]
    m = old["meta"]
    return write_report(out, config, specs, entries, old["stage_seconds"], old["total_seconds"], m["threads"],
                        m["command"], old["shuffle"], write_benchmarks,
                        measured={"date": m["date"], "machine": m["machine"]})


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATASETS))
    parser.add_argument("--backbone", default="autonat", choices=("autonat", "maskgit"),
                        help="the frozen backbone: autonat (default) or maskgit (Fashion-MNIST only)")
    parser.add_argument("--config", default=None, help="demo config (default: the dataset's demo config)")
    parser.add_argument("--out", default="output/ablation", help="output folder")
    parser.add_argument("--data", default=None, help="data root (default config.demo.data_root)")
    parser.add_argument("--assets", default=None, help="folder of the demo weights (default config.demo.assets)")
    parser.add_argument("--fashion-mnist", default=None, metavar="DIR", help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the tables of a finished run in --out from its files (no stage runs again)")
    parser.add_argument("--no-write-benchmarks", action="store_true",
                        help="do not write benchmarks/ABLATION.md and benchmarks/ablation.csv")
    args, overrides = parse_demo_args(parser, argv)
    key = (DATASETS[args.dataset], args.backbone)
    if key not in CONFIGS and not args.config:
        parser.error(f"--backbone {args.backbone} has no default config for --dataset {args.dataset} (give --config)")
    config_file = args.config or CONFIGS[key]
    try:
        load_demo_config(config_file, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if e.args else e))
    command = "make ablation" + (f" DATA={args.dataset}" if args.dataset != "fashion_mnist" else "") + \
        (f" BACKBONE={args.backbone}" if args.backbone != "autonat" else "")
    if args.report_only:
        return driver_main("ablation", lambda: logged(args, lambda: report_only(config_file, overrides, args.out,
                                                                                not args.no_write_benchmarks)))
    return driver_main("ablation", lambda: logged(args, lambda: run_ablation(
        config_file, overrides, args.out, args.data, args.assets, args.threads, args.fashion_mnist,
        not args.no_write_benchmarks, command)))


def logged(args, run) -> dict:
    """run(), then (--log-with) the ablation's numbers and table to the tracker in --out; a missing package stops
    it before any stage."""
    check_log_with(args.log_with)
    result = run()
    log_ablation(args.log_with, resolve(args.out), result)  # after ablation.json and the tables are written
    return result


def log_ablation(kind: str, out, result: dict):
    """nll/<model>, fid/<model>, nll_diff/<a>-<b>, fid_diff/<a>-<b> and the markdown table (text) at step 0."""
    table = markdown(result["rows"], result["nll"], result["fid"], result["diagnostics"], result["meta"])
    log_run(kind, out, "ablation", [(0, tracker_scalars(result["nll"], result["fid"]))], texts={"ablation": table})


if __name__ == "__main__":
    main()
