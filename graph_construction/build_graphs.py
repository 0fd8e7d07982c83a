"""Builds the three KA-MIG knowledge graphs from a token dataset (docs/reference.md#knowledge-graphs).

    python -m graph_construction.build_graphs --tokens assets/imagenet256_vq_features/train

writes into config.graph.dir (default graph_prior/; --out overrides), next to a `<file>.json` metadata sidecar each,
  codebook_co_occurrence_norm_self_50.pkl   G_co, [edge_index, edge_weight] like the released file
  codebook_replace_graph_norm_self.pkl      G_s,  [edge_index, edge_weight] like the released file
  incompatibility.npz                       G_p as packed (class, position, token) occurrence bits
The recipe is config.graph.recipe (`--config.graph.recipe.sim_k=3`, or the flags below, which override it).
G_co and G_s use a seeded random subset of `max_images` token maps (paper: 50K), G_p all maps.
Before any counting the recipe values are checked (types, finite numbers, ranges; --sim-k against the codebook) and
the token dataset is read through libs.data.tokens.load_tokens (malformed or empty datasets are refused). The
graphs are written into a staging folder inside the output folder and renamed into place together once all are
written, so a failure leaves the old graphs as they were; building only some graphs (--graphs) into a folder whose
other graphs come from another token dataset is refused (training and sampling refuse such a mixed folder).
"""
import argparse
import functools
import hashlib
import time
from pathlib import Path

from tqdm import tqdm

from libs.atomic_io import atomic_write_files
from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import parse_args_with_config
from libs.data.tokens import dataset_sha256, load_tokens
from libs.errors import BadInput, UserError
from libs.folder_lock import FolderLock
from libs.graphs import recipes as G
from libs.graphs.files import (GRAPH_FILES, GRAPH_TITLES, graph_paths, mixed_sources, read_meta, sample_tokens,
                               save_edge_graph, save_incompatibility, save_sample_tokens)

GRAPHS = tuple(GRAPH_FILES)  # co, sim, incompat
RECIPE_FLAGS = ("max_images", "seed", "neighbourhood", "co_ratio", "sim_k", "sim_alpha", "sim_measure",
                "sim_frobenius_norm")


def parse_args(argv=None):
    """Command-line flags -> (argparse.Namespace with the resolved recipe values, config)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True,
                   help="token dataset: a directory (tokens.npy, labels.npy, meta.json) or the paper's .npy")
    p.add_argument("--out", default=None, help="output folder (default config.graph.dir, graph_prior/)")
    p.add_argument("--graphs", default=",".join(GRAPHS), help="comma list of co,sim,incompat (default all)")
    p.add_argument("--neighbourhood", type=int, default=None, choices=(4, 8),
                   help="G_co neighbourhood (default config.graph.recipe.neighbourhood, 8)")
    p.add_argument("--co-ratio", type=float, default=None,
                   help="G_co keeps max(1, int(nnz*ratio)) per row (default config.graph.recipe.co_ratio, 0.05: "
                        "51 neighbours of 1023, as the released file)")
    p.add_argument("--sim-k", type=int, default=None, help="G_s neighbours per token (default recipe.sim_k, 2)")
    p.add_argument("--sim-alpha", type=float, default=None,
                   help="G_s weight exp(-alpha*JS) (default recipe.sim_alpha, 5)")
    p.add_argument("--sim-measure", default=None, choices=G.SIM_MEASURES,
                   help="G_s measure: Jensen-Shannon divergence (default recipe.sim_measure, as the released "
                        "file) or distance (its square root)")
    p.add_argument("--sim-frobenius-norm", default=None, action=argparse.BooleanOptionalAction,
                   help="G_s: divide the min-max normalised histograms by their Frobenius norm before the "
                        "softmax (default recipe.sim_frobenius_norm, off, as the released file)")
    p.add_argument("--max-images", type=int, default=None,
                   help="token maps sampled for G_co / G_s (<= 0: all; default recipe.max_images, 50000)")
    p.add_argument("--seed", type=int, default=None, help="seed of the G_co / G_s sample (default recipe.seed, 0)")
    p.add_argument("--codebook-size", type=int, default=None, help="expected codebook size (default: dataset's)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of G_p (default: the dataset's; must cover every label)")
    p.add_argument("--num-threads", type=int, default=None, help="counting threads (default: CPU count, max 4)")
    p.add_argument("--write-sample-tokens", action="store_true",
                   help="also write the sample as a train_img_50K_token.pkl-style dict (paper notebooks)")
    args, config = parse_args_with_config(p, "configs/ka_mig_l.py", argv)
    for key in RECIPE_FLAGS:  # a flag overrides the config's recipe
        if getattr(args, key) is None:
            setattr(args, key, config.graph.recipe[key])
    args.out = args.out or config.graph.dir
    args.graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip())
    unknown = [g for g in args.graphs if g not in GRAPHS]
    if unknown or not args.graphs:
        p.error(f"--graphs takes a comma list of {','.join(GRAPHS)}, got '{','.join(args.graphs)}'")
    return args


def sample_file_name(n: int) -> str:
    """train_img_50K_token.pkl for 50000 maps, train_img_<n>_token.pkl otherwise."""
    return f"train_img_{n // 1000}K_token.pkl" if n % 1000 == 0 else f"train_img_{n}_token.pkl"


def bar(desc):
    """A tqdm wrapper for the libs' `progress` argument."""
    return functools.partial(tqdm, desc=desc, unit="chunk", leave=False)


def check_recipe(args, codebook_size=None):
    """BadInput listing every recipe value the chosen graphs cannot use (libs.graphs.recipes.recipe_problems) and
    every unusable size flag; with `codebook_size`, --sim-k is checked against it too. Runs before any counting."""
    problems = [f"--{k.replace('_', '-')} / config.graph.recipe.{k} = {v!r} (allowed: {allowed})"
                for k, v, allowed in G.recipe_problems(vars(args), args.graphs, codebook_size)]
    for flag in ("codebook_size", "num_classes", "num_threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} = {value} (allowed: an integer >= 1)")
    if problems:
        raise BadInput("unusable graph recipe: " + "; ".join(problems))


def check_no_mix(out: Path, graphs, source: dict):
    """BadInput when building only `graphs` into `out` would leave them next to graphs of another token dataset
    (training and sampling refuse such a folder)."""
    others = {n: read_meta(p) for n, p in graph_paths(out).items() if n not in graphs and p.is_file()}
    for name, meta in others.items():
        mixed = mixed_sources({graphs[0]: source, name: meta})  # [new graph, an old one kept]
        if mixed:
            raise BadInput(f"{out} holds {GRAPH_TITLES[name]} of another token dataset ({mixed}); building only "
                           f"--graphs {','.join(graphs)} would mix the two: build all graphs, or choose another --out")


def main(argv=None):
    """Parses the flags and builds the graphs holding the output folder's lock (one process per graph folder:
    a second build_graphs into it stops at once, FolderBusy naming the first one's pid); returns {name: path}."""
    args = parse_args(argv)
    with FolderLock(args.out, "graph folder", "or choose another --out"):
        return build(args)


def build(args):
    """Loads the tokens, builds the chosen graphs and writes them with metadata; returns {name: path}."""
    check_recipe(args)

    t0 = time.time()
    try:
        tokens, labels, meta = load_tokens(args.tokens, codebook_size=args.codebook_size)  # [N,L], [N]
    except UserError:
        raise
    except (OSError, EOFError, ValueError, KeyError) as e:  # a damaged tokens.npy / labels.npy / meta.json
        raise BadInput(f"{args.tokens}: unreadable token dataset ({type(e).__name__}: {e})") from e
    K, grid, L = int(meta["codebook_size"]), int(meta["grid"]), int(tokens.shape[1])
    if grid * grid != L:
        raise BadInput(f"{args.tokens}: rows of {L} ids do not form a {grid}x{grid} grid")
    check_recipe(args, K)
    N = int(tokens.shape[0])
    maps = tokens.reshape(N, grid, grid)  # [N,h,w], a view (stays memory-mapped)
    num_classes = args.num_classes if args.num_classes is not None else meta.get("num_classes")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if N else 0
    if N and "incompat" in args.graphs and int(labels.max()) >= num_classes:
        raise BadInput(f"{args.tokens}: labels go up to {int(labels.max())}, more than --num-classes {num_classes} "
                       "classes can hold")
    out = Path(args.out)
    check_writable(folders=[out])  # before the counting, not after it
    source = {"source_dataset": str(Path(args.tokens).resolve()), "source_sha256": dataset_sha256(args.tokens)}
    check_no_mix(out, args.graphs, source)
    print(f"{N} token maps of {grid}x{grid} over {K} codes, {num_classes} classes from {args.tokens}")

    idx = G.sample_image_indices(N, args.max_images, args.seed)  # sorted rows for G_co / G_s
    sample = maps[idx] if len(idx) < N else maps  # [n,h,w]
    common = {
        **source,
        "dataset_format": meta.get("format"),
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "codebook_size": K, "grid": grid, "seq_len": L,
        "num_maps_total": N, "rows_per_image": meta.get("rows_per_image"),
        "built_by": "graph_construction.build_graphs",
    }
    subset = {"num_nodes": K, "num_maps_used": int(len(idx)), "max_images": args.max_images, "seed": args.seed,
              "sample_indices_sha256": hashlib.sha256(idx.tobytes()).hexdigest()}
    written = {}

    def write_graphs(stage: Path):
        """Every chosen graph into `stage`; they reach `out` together once all are written."""
        if "co" in args.graphs:
            counts = G.co_occurrence_counts(sample, K, args.neighbourhood, num_threads=args.num_threads,
                                            progress=bar("G_co counts"))  # [K,K]
            ei, ew = G.co_occurrence_graph(counts, args.co_ratio)
            recipe = {"graph": "co_occurrence", "neighbourhood": args.neighbourhood, "ratio": args.co_ratio,
                      "top_k": "max(1, int(nnz_row * ratio)) by torch.topk (CPU) over the row's non-zero float32 "
                               "counts in id order, ties as torch.topk keeps them", "self_loops": 1.0,
                      "scaling": "1/sqrt(c_i*c_j), c = out-edges incl. self-loop"}
            save_edge_graph(stage / GRAPH_FILES['co'], ei, ew, {**common, **subset, "recipe": recipe})
            written["co"] = out / GRAPH_FILES['co']
            print(f"G_co: {ew.shape[0]} edges -> {written['co']}")

        if "sim" in args.graphs:
            hist = G.position_histograms(sample, K, num_threads=args.num_threads, progress=bar("G_s histograms"))
            ei, ew = G.similarity_graph(hist, args.sim_k, args.sim_alpha, args.sim_measure,
                                        frobenius_norm=args.sim_frobenius_norm, progress=bar("G_s Jensen-Shannon"))
            recipe = {"graph": "similarity", "k": args.sim_k, "alpha": args.sim_alpha,
                      "measure": f"Jensen-Shannon {args.sim_measure} (natural log)",
                      "frobenius_norm": bool(args.sim_frobenius_norm),
                      "normalisation": "row min-max, " + ("/ Frobenius norm, " if args.sim_frobenius_norm else "")
                                       + "row softmax",
                      "neighbours": "k smallest, ties -> smaller id",
                      "self_loops": 1.0, "scaling": "1/sqrt(c_i*c_j), c = out-edges incl. self-loop"}
            save_edge_graph(stage / GRAPH_FILES['sim'], ei, ew, {**common, **subset, "recipe": recipe})
            written["sim"] = out / GRAPH_FILES['sim']
            print(f"G_s: {ew.shape[0]} edges -> {written['sim']}")

        if "incompat" in args.graphs:
            packed = G.occurrence_bits(maps, labels, num_classes, K, num_threads=args.num_threads,
                                       progress=bar("G_p occurrence"))  # [C,L,ceil(K/8)]
            recipe = {"graph": "incompatibility", "maps": "all",
                      "rows": "1/|I| on tokens I never seen at (class, position), 0 elsewhere",
                      "storage": "np.packbits(occurs, axis=-1, bitorder='little'); null class (id C) = zeros"}
            save_incompatibility(stage / GRAPH_FILES['incompat'], packed,
                                 {**common, "num_classes": num_classes, "num_maps_used": N, "recipe": recipe})
            written["incompat"] = out / GRAPH_FILES['incompat']
            print(f"G_p: {packed.nbytes / 2 ** 20:.1f} MiB of bits -> {written['incompat']}")

        if args.write_sample_tokens:
            name = sample_file_name(len(idx))
            save_sample_tokens(stage / name, sample_tokens(tokens, args.max_images, args.seed))
            written["sample_tokens"] = out / name
            print(f"sample tokens: {len(idx)} maps -> {written['sample_tokens']}")

    atomic_write_files(out, write_graphs)  # the graphs of one run replace the old ones together
    print(f"done in {time.time() - t0:.1f} s")
    return written


if __name__ == "__main__":
    run_main(main)
