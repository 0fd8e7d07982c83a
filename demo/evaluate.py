"""Evaluation stages of the CPU demo: held-out NLL, FID with its spread, the backbone's held-out curve, and the
FID reference features.

    python -m demo.evaluate nll --config C --models models.json --tokens <token dataset> --out nll.npz
    python -m demo.evaluate fid --config C --models models.json --samples <folder of generate_npz.py runs> \
        --heldout <held-out ImageFolder split> --out fid.json [--reference-features F]
    python -m demo.evaluate curve --config C --run <train_graph.py run folder> --tokens <token dataset> --out curve.csv
    python -m demo.evaluate reference --config C --heldout <held-out ImageFolder split> --out reference.npz
    python -m demo.evaluate diagnostics --config C --models models.json --tokens <token dataset> --out diag.json
models.json (written by demo/pipeline.py) lists {name, label, kind, checkpoint, overrides}: each model is
built through libs.models.factory from the config plus its --config.* overrides and loaded strictly.

FID spread (`half_sample_spread`): B random halves of the n samples (without replacement; the same halves for
every model, whose sample i shares its label and seed); the spread of FID over halves of size n/2 estimates
the sampling standard deviation of FID at n (the delete-half jackknife: for a mean, the variance of a half
drawn without replacement is exactly that of the full-sample mean), and likewise for differences between
models. The reference set is held fixed. The interval reported is FID_n +- z * SD (normal approximation).
"""
import argparse
import copy
import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from libs.atomic_io import atomic_savez, atomic_write_json, atomic_write_text
from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import apply_override, parse_args_with_config, split_overrides
from libs.data.images import list_image_folder, read_rgb
from libs.data.tokens import load_tokens_for_model
from libs.errors import BadInput, MissingInput
from libs.evaluation import metrics
from libs.evaluation.nll import masked_nll, t_interval
from libs.models.factory import GRAPH_KINDS, MODEL_KINDS, build_model, check_model_kind, load_model, model_kind

# ----------------------------------------------------------------------------- models


MODEL_KEYS = ("name", "kind", "checkpoint", "overrides")  # the keys of every models.json entry


def read_models(path, config=None) -> list:
    """The entries of a models.json (a non-empty list of {name, kind, checkpoint, overrides} objects), each
    checked before any work: kind known (and built on config.backbone when `config` is given), overrides a list
    of --config.<key>=<value> strings that apply to `config`, checkpoint present when given.
    Raises MissingInput (no such file, or an absent checkpoint) or BadInput naming the file, entry and key."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--models {path}: no such file (a models.json list of {{{', '.join(MODEL_KEYS)}}})")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"--models {path}: not JSON ({e})") from e
    if not isinstance(entries, list) or not entries:
        got = "an empty list" if entries == [] else f"a JSON {type(entries).__name__}"
        raise BadInput(f"--models {path}: expected a non-empty list of model objects "
                       f"{{{', '.join(MODEL_KEYS)}}}, got {got}")
    for i, e in enumerate(entries):
        check_model_entry(path, i, e, config)
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise BadInput(f"--models {path}: model names must differ, got {names}")
    return entries


def check_model_entry(path, i: int, e, config=None):
    """Raises MissingInput / BadInput for entry `i` of models file `path` (see read_models)."""
    where = f"--models {path}: entry {i}"
    if not isinstance(e, dict):
        raise BadInput(f"{where} is {json.dumps(e)[:60]}, not an object {{{', '.join(MODEL_KEYS)}}}")
    missing = [k for k in MODEL_KEYS if k not in e]
    if missing:
        raise BadInput(f"{where} ({e.get('name')}) lacks {missing}")
    if not isinstance(e["name"], str) or not e["name"]:
        raise BadInput(f"{where}: name={e['name']!r} must be a non-empty string")
    where = f"--models {path}: model {e['name']}"
    if not isinstance(e["overrides"], list) or not all(isinstance(o, str) for o in e["overrides"]):
        raise BadInput(f"{where}: overrides={json.dumps(e['overrides'])[:80]} must be a list of "
                       f"\"--config.<key>=<value>\" strings")
    if e["kind"] not in MODEL_KINDS:
        raise BadInput(f"{where}: kind={e['kind']!r} is not one of {', '.join(MODEL_KINDS)}")
    if e["checkpoint"] is not None and not isinstance(e["checkpoint"], str):
        raise BadInput(f"{where}: checkpoint={e['checkpoint']!r} must be a file path (or null for the default)")
    if e["checkpoint"] and not Path(e["checkpoint"]).is_file():
        raise MissingInput(f"{where}: checkpoint {e['checkpoint']} not found")
    if config is not None:
        try:
            cfg = entry_config(config, e)
            check_model_kind(cfg, e["kind"])
        except BadInput as err:
            raise BadInput(f"{where}: {err}") from err
        except (KeyError, ValueError) as err:
            raise BadInput(f"{where}: {err.args[0] if err.args else err}") from err


def entry_config(config, entry: dict):
    """A copy of `config` with the entry's --config.* overrides applied (KeyError: unknown key; ValueError:
    a value of another type; BadInput: an item that is not --config.<key>=<value>)."""
    cfg = copy.deepcopy(config)
    pairs, rest = split_overrides(entry["overrides"])
    if rest:
        raise BadInput(f"model {entry['name']}: overrides must be --config.<key>=<value>, got {rest}")
    for key, value in pairs:
        apply_override(cfg, key, value)
    return cfg


def load_entry_model(config, entry: dict, device="cpu"):
    """(model in eval mode, its config) of a models.json entry."""
    cfg = entry_config(config, entry)
    return load_model(cfg, entry["kind"], entry["checkpoint"], device), cfg


def select_rows(n_total: int, n: int) -> np.ndarray:
    """n row indices spread evenly over [0, n_total) (all rows when n <= 0 or n >= n_total).

    Token datasets list images class by class, so evenly spread rows keep the classes balanced."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.floor(np.arange(n) * (n_total / n)).astype(np.int64))


def heldout_tokens(path, config, n: int = 0):
    """(tokens int64 [N,L], labels [N], rows) of a token dataset, `n` evenly spread rows (0 = all)."""
    tokens, labels, _ = load_tokens_for_model(path, config.model, key="--tokens")
    rows = select_rows(len(labels), n)
    return np.asarray(tokens[rows]).astype(np.int64), np.asarray(labels[rows]).astype(np.int64), rows


# ----------------------------------------------------------------------------- NLL


def run_nll(config, models_file, tokens_path, out):
    d = config.demo
    entries = read_models(models_file, config)
    tokens, labels, rows = heldout_tokens(tokens_path, config, d.nll_images)
    ratios = np.asarray(d.nll_ratios, dtype=np.float64)
    values, seconds = [], {}
    print(f"held-out NLL: {len(labels)} images of {tokens_path}, mask ratios {ratios.tolist()}, seed {d.nll_seed}")
    for e in entries:
        t0 = time.time()
        model, _ = load_entry_model(config, e)
        nll = masked_nll(model, tokens, labels, ratios, seed=d.nll_seed, batch_size=d.nll_batch_size)  # [N,R]
        values.append(nll)
        seconds[e["name"]] = round(time.time() - t0, 2)
        ci = t_interval(nll.mean(1), d.ci_level)
        print(f"  {e['name']:<24} NLL {ci['mean']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]  "
              f"per ratio {np.round(nll.mean(0), 4).tolist()}  ({seconds[e['name']]:.0f} s)", flush=True)
    atomic_savez(out, {"names": np.asarray([e["name"] for e in entries]), "nll": np.stack(values),  # [M,N,R]
                       "ratios": ratios, "labels": labels, "rows": rows, "seed": np.asarray(d.nll_seed)})
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- FID


def reference_images(heldout_dir, per_class: int):
    """(uint8 [M,H,W,3], relative paths) of the first `per_class` images of every class of an ImageFolder split
    (listing order: class, then file name), read with the repo's image reader."""
    heldout_dir = Path(heldout_dir)
    names, items = list_image_folder(heldout_dir)
    chosen = []
    for c in range(len(names)):
        of_class = [rel for rel, label in items if label == c][:per_class]
        if len(of_class) < per_class:
            raise BadInput(f"{heldout_dir}: class {names[c]} has {len(of_class)} images, fewer than the "
                           f"{per_class} FID reference images per class")
        chosen += of_class
    return np.stack([read_rgb(heldout_dir / rel) for rel in chosen]), [str(rel) for rel in chosen]


def images_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def inception_features(images, extractor, batch_size: int, desc: str) -> np.ndarray:
    from libs.evaluation.fid_stats import extract_features
    pool, _ = extract_features(images, extractor, batch_size, progress=True, desc=desc)
    return pool  # [N,2048] float64


class Reference:
    """Reference statistics prepared once: mean, covariance, a factor F (sigma = F F^T) and its trace."""

    def __init__(self, features: np.ndarray):
        self.features = np.asarray(features, dtype=np.float64)
        self.mu, self.sigma = metrics.feature_statistics(self.features)
        self.factor = metrics._psd_factor(self.sigma)  # [D,r]
        self.trace = float(np.trace(self.sigma))


def fid_to_reference(features: np.ndarray, ref: Reference) -> float:
    """FID of features [n,D] against `ref`, via the sample factor: with A = (X - mean) / sqrt(n-1), the sample
    covariance is A^T A, and tr((S_x S_ref)^{1/2}) is the sum of the singular values of A F (F F^T = S_ref).
    Equal to metrics.frechet_distance up to round-off; a fraction of its cost for n << D."""
    x = np.asarray(features, dtype=np.float64)
    mu = x.mean(0)
    a = (x - mu) / math.sqrt(x.shape[0] - 1)  # [n,D]
    g = a @ ref.factor  # [n,r]
    small = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(small), 0.0, None)).sum())
    return float(((mu - ref.mu) ** 2).sum() + (a * a).sum() + ref.trace - 2.0 * tr_covmean)


def half_sample_spread(features: dict, ref: Reference, n_subsets: int, seed: int, pairs=()) -> dict:
    """{'fid_half': {name: [B]}, 'sd': {name: sd}, 'diff_sd': {'a-b': sd}} from B random halves (see the module
    docstring). `features`: name -> [n,D] with row i of every model made from the same label and seed."""
    n = {len(f) for f in features.values()}
    if len(n) != 1:
        raise ValueError(f"every model needs the same number of samples, got {sorted(n)}")
    n = n.pop()
    rng = np.random.default_rng(seed)
    halves = [np.sort(rng.permutation(n)[: n // 2]) for _ in range(n_subsets)]
    fid_half = {name: np.array([fid_to_reference(f[h], ref) for h in halves]) for name, f in features.items()}
    return {"fid_half": fid_half,
            "sd": {name: float(v.std(ddof=1)) for name, v in fid_half.items()},
            "diff_sd": {f"{a}-{b}": float((fid_half[a] - fid_half[b]).std(ddof=1)) for a, b in pairs}}


def normal_quantile(level: float) -> float:
    from scipy import stats
    return float(stats.norm.ppf(0.5 + level / 2))


def load_reference_features(path, sha: str):
    """(features float64 [M,D], note) from a reference file made by `reference` when it describes the same
    images (same sha256 of their pixels); (None, why not) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None, f"{path} not found"
    check_reference_file(path)
    with np.load(path, allow_pickle=False) as z:
        stored = str(z["images_sha256"])
        if stored != sha:
            return None, f"{path} describes other images (sha256 {stored[:12]} vs {sha[:12]})"
        return np.asarray(z["features"], dtype=np.float64), f"committed features {path} (same images)"


REFERENCE_KEYS = ("features", "images_sha256")  # what `reference` writes and `fid` reads


def check_reference_file(path):
    """Raises BadInput unless an existing `path` is an .npz holding REFERENCE_KEYS (as `reference` writes it)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files) if isinstance(z, np.lib.npyio.NpzFile) else set()
    except (OSError, ValueError, EOFError) as e:
        raise BadInput(f"--reference-features {path}: not an .npz file ({e})") from e
    missing = [k for k in REFERENCE_KEYS if k not in keys]
    if missing:
        raise BadInput(f"--reference-features {path}: lacks {missing} (has {sorted(keys)}); make it with "
                       f"`python -m demo.evaluate reference`")


def samples_files(samples_root, entries) -> dict:
    """{model name: <samples_root>/<name>/samples.npz}; MissingInput / BadInput when one is absent or lacks
    arr_0 / labels."""
    files = {}
    for e in entries:
        npz = Path(samples_root) / e["name"] / "samples.npz"
        if not npz.is_file():
            raise MissingInput(f"no samples for model {e['name']}: {npz}")
        try:
            with np.load(npz, allow_pickle=False) as z:
                keys = set(z.files) if isinstance(z, np.lib.npyio.NpzFile) else set()
        except (OSError, ValueError, EOFError) as err:
            raise BadInput(f"{npz}: not an .npz file ({err})") from err
        missing = [k for k in ("arr_0", "labels") if k not in keys]
        if missing:
            raise BadInput(f"{npz}: lacks {missing} (has {sorted(keys)}), not a generate_npz.py samples file")
        files[e["name"]] = npz
    return files


def run_fid(config, models_file, samples_root, heldout_dir, out, reference_file=None):
    from libs.evaluation.inception import load_feature_extractor
    d = config.demo
    entries = read_models(models_file, config)
    npz_files = samples_files(samples_root, entries)
    if reference_file:
        check_reference_file(reference_file)
    t0 = time.time()
    ref_images, ref_files = reference_images(heldout_dir, d.fid_reference_per_class)
    sha = images_sha256(ref_images)
    extractor = load_feature_extractor(device="cpu")
    ref_feats, note = (load_reference_features(reference_file, sha) if reference_file
                       else (None, "no reference features file configured"))
    if ref_feats is None:
        print(f"reference: computing the Inception features of {len(ref_images)} held-out images ({note})")
        ref_feats = inception_features(ref_images, extractor, d.batch_size, "reference")
        note = f"computed by this run ({note})"
    else:
        print(f"reference: {note}")
    ref = Reference(ref_feats)
    feats, labels = {}, None
    for e in entries:
        npz = npz_files[e["name"]]
        with np.load(npz, allow_pickle=False) as z:
            images, lab = z["arr_0"], z["labels"]
        if labels is None:
            labels = lab
        elif not np.array_equal(labels, lab):
            raise BadInput(f"{npz}: labels differ from the first model's; the models must share labels and seeds")
        feats[e["name"]] = inception_features(images, extractor, d.batch_size, e["name"])
    names = [e["name"] for e in entries]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[:i]][::-1]  # every later model minus earlier
    spread = half_sample_spread(feats, ref, d.fid_spread_subsets, d.fid_spread_seed, pairs)
    z = normal_quantile(d.ci_level)
    result = {"models": {}, "differences": {}, "n_samples": int(len(labels)), "n_reference": int(len(ref_feats)),
              "reference": {"images": f"first {d.fid_reference_per_class} per class of {heldout_dir}",
                            "images_sha256": sha, "features": note, "inception_weights": extractor.source},
              "spread": {"method": "delete-half jackknife: SD of FID over random halves (n/2, without replacement, "
                                   "the same halves for every model); interval = FID(n) +- z SD",
                         "subsets": int(d.fid_spread_subsets), "seed": int(d.fid_spread_seed), "level": d.ci_level,
                         "z": z}}
    for name in names:
        fid = metrics.frechet_distance(*metrics.feature_statistics(feats[name]), ref.mu, ref.sigma)
        precision, recall = metrics.precision_recall(ref.features, feats[name], k=3)
        sd = spread["sd"][name]
        result["models"][name] = {"fid": fid, "sd": sd, "lo": fid - z * sd, "hi": fid + z * sd,
                                  "fid_half_mean": float(spread["fid_half"][name].mean()),
                                  "precision": float(precision), "recall": float(recall)}
        print(f"  {name:<24} FID {fid:8.3f} +- {z * sd:.3f}  precision {precision:.3f} recall {recall:.3f}")
    for a, b in pairs:
        diff = result["models"][a]["fid"] - result["models"][b]["fid"]
        sd = spread["diff_sd"][f"{a}-{b}"]
        result["differences"][f"{a}-{b}"] = {"diff": diff, "sd": sd, "lo": diff - z * sd, "hi": diff + z * sd}
    atomic_write_json(out, json.loads(json.dumps(result, default=float)), indent=1, sort_keys=False)
    print(f"wrote {out} in {time.time() - t0:.0f} s")  # the time is printed, not stored: same inputs, same file


def run_reference(config, heldout_dir, out):
    """Inception features (stored as float16) of the FID reference images, with the sha256 of their pixels."""
    from libs.evaluation.inception import load_feature_extractor
    d = config.demo
    images, files = reference_images(heldout_dir, d.fid_reference_per_class)
    extractor = load_feature_extractor(device="cpu")
    feats = inception_features(images, extractor, d.batch_size, "reference")
    f16 = feats.astype(np.float16)
    ref64, ref16 = Reference(feats), Reference(f16.astype(np.float64))
    # how much storing float16 moves a FID: the reference against itself perturbed by half the images
    probe = feats[: len(feats) // 2]
    shift = abs(fid_to_reference(probe, ref64) - fid_to_reference(probe, ref16))
    atomic_savez(out, {"features": f16, "images_sha256": np.asarray(images_sha256(images)),
                       "files": np.asarray(files), "inception_weights": np.asarray(extractor.source),
                       "float16_fid_shift": np.asarray(shift)})
    print(f"wrote {out}: {f16.shape} float16 features of {len(files)} images ({extractor.source}); storing float16 "
          f"moves a FID by {shift:.2e}")


# ----------------------------------------------------------------------------- backbone curve


def checkpoint_steps(run_dir) -> list:
    """[(step, path)] of train_graph.py's checkpoints, by step."""
    files = Path(run_dir, "checkpoints").glob("step_*.pt")
    return sorted((int(p.name[5:-3]), p) for p in files if p.name[5:-3].isdigit())


def check_pretrain_state(state, path, backbone_keys):
    """Raises BadInput unless `state` (a loaded step_*.pt) is a backbone pretraining checkpoint: train.mode
    'pretrain' in its stored config, and 'model' / 'ema' weights all of the backbone's (names in backbone_keys)."""
    if not isinstance(state, dict) or not {"model", "ema"} <= set(state):
        raise BadInput(f"--run: {path} is not a train_graph.py checkpoint (no 'model' / 'ema' entries)")
    mode = ((state.get("config") or {}).get("train") or {}).get("mode", "pretrain")
    foreign = sorted(k for which in ("model", "ema") for k in state[which] if k not in backbone_keys)
    if mode != "pretrain" or foreign:
        found = f"train.mode={mode}" + (f", weights {foreign[0]} ..." if foreign else "")
        raise BadInput(f"--run: {path} is not a backbone pretraining checkpoint ({found}); curve needs a "
                       f"train_graph.py run with train.mode=pretrain on this config's backbone")


def run_curve(config, run_dir, tokens_path, out):
    """Held-out NLL (mean over the mask ratios) of the raw and EMA weights of every saved checkpoint -> CSV.

    Raises MissingInput (no checkpoints) or BadInput (a checkpoint of another train.mode) before any evaluation."""
    d = config.demo
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise MissingInput(f"no checkpoints in {Path(run_dir) / 'checkpoints'}")
    model = build_model(config, model_kind(config, graphs=False)).eval()  # AutoNAT or MaskGIT (config.backbone)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    check_pretrain_state(torch.load(steps[-1][1], map_location="cpu", weights_only=True), steps[-1][1], base)
    tokens, labels, _ = heldout_tokens(tokens_path, config, d.curve_images)
    log = {}
    log_path = Path(run_dir) / "log.csv"
    if log_path.is_file():
        with open(log_path) as f:
            for row in csv.DictReader(f):
                log[int(float(row["step"]))] = float(row["loss"])
    rows, prev = [], 0
    for step, path in steps:
        state = torch.load(path, map_location="cpu", weights_only=True)
        check_pretrain_state(state, path, base)
        row = {"step": step, "images": len(labels)}
        train = [v for s, v in log.items() if prev < s <= step]
        row["train_loss"] = float(np.mean(train)) if train else float("nan")
        for which in ("model", "ema"):
            weights = dict(base)
            weights.update({k: v.to(base[k].dtype) for k, v in state[which].items()})
            model.load_state_dict(weights, strict=True)
            nll = masked_nll(model, tokens, labels, d.nll_ratios, seed=d.nll_seed, batch_size=d.nll_batch_size)
            ci = t_interval(nll.mean(1), d.ci_level)
            key = "raw" if which == "model" else "ema"
            row.update({f"{key}_nll": ci["mean"], f"{key}_lo": ci["lo"], f"{key}_hi": ci["hi"]})
            row.update({f"{key}_r{r:g}": float(v) for r, v in zip(d.nll_ratios, nll.mean(0))})
        rows.append(row)
        prev = step
        print(f"  step {step:6d}: held-out NLL raw {row['raw_nll']:.4f}, EMA {row['ema_nll']:.4f} "
              f"(train loss {row['train_loss']:.4f}, label smoothing {config.train.label_smoothing:g})", flush=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    atomic_write_text(out, buf.getvalue())
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- diagnostics


MODULE_GROUPS = ("co_graph_layer", "re_graph_layer", "pos_neg_codebook_graph_layer", "zero_convs", "zero_convs_pos")


def fusion_diagnostics(model, tokens, labels, ratio: float = 0.5, seed: int = 0) -> dict:
    """What a trained KA-MIG's graph terms do on held-out tokens masked at `ratio` (fixed seeded masks):

    - relative size of the term added before every block, |term| / |hidden state| over the token positions
      (RMS over the batch), in forward order;
    - gradient norm of the masked-token cross-entropy (no label smoothing) reaching each graph module group.
    """
    from libs.evaluation.nll import fixed_masks
    ids = torch.as_tensor(tokens).long()
    cls = torch.as_tensor(labels).long()
    mask = fixed_masks(len(ids), ids.shape[1], [ratio], seed)[0]
    inputs = torch.where(mask, torch.full_like(ids, model.mask_token_id), ids)
    model.eval()
    sizes = []
    with torch.enable_grad():
        model.zero_grad(set_to_none=True)
        for p in model.graph_layer.parameters():
            p.requires_grad_(True)
        inject = model.fused_injection(inputs, model.fusion_tables(), model.negative_terms(cls))

        def recording(j, h):
            out = inject(j, h)
            sizes.append(float((out - h)[:, 1:].detach().norm() / h[:, 1:].detach().norm().clamp_min(1e-12)))
            return out

        logits = model.head(model.forward_blocks(model.embed(inputs, cls), recording))
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), ids[mask])
        loss.backward()
    grads = {}
    for group in MODULE_GROUPS:
        module = getattr(model.graph_layer, group, None)
        if module is not None:
            g = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
            grads[group] = float(torch.stack(g).sum().sqrt()) if g else 0.0
    model.zero_grad(set_to_none=True)
    return {"ratio": ratio, "images": int(len(ids)), "term_over_hidden_per_block": sizes,
            "term_over_hidden_mean": float(np.mean(sizes)) if sizes else 0.0,
            "grad_norm": grads, "loss": float(loss)}


def run_diagnostics(config, models_file, tokens_path, out, images: int = 500):
    entries = [e for e in read_models(models_file, config) if e["kind"] in GRAPH_KINDS]
    tokens, labels, _ = heldout_tokens(tokens_path, config, images)
    result = {}
    for e in entries:
        model, cfg = load_entry_model(config, e)
        if not any((cfg.graph.use_co, cfg.graph.use_sim, cfg.graph.use_incompat)):
            continue  # the control has no graph terms
        result[e["name"]] = d = fusion_diagnostics(model, tokens, labels)
        print(f"  {e['name']:<24} |term|/|h| per block {np.round(d['term_over_hidden_per_block'], 4).tolist()}  "
              f"grad norms {{{', '.join(f'{k}: {v:.2e}' for k, v in d['grad_norm'].items())}}}", flush=True)
    atomic_write_json(out, result, indent=1, sort_keys=False)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("nll", "fid", "curve", "reference", "diagnostics"))
    parser.add_argument("--models", help="models.json (nll, fid)")
    parser.add_argument("--tokens", help="held-out token dataset (nll, curve)")
    parser.add_argument("--samples", help="folder of <model name>/samples.npz (fid)")
    parser.add_argument("--heldout", help="held-out ImageFolder split (fid, reference)")
    parser.add_argument("--reference-features", default=None, help="reference features file (fid)")
    parser.add_argument("--run", help="train_graph.py run folder with checkpoints/ and log.csv (curve)")
    parser.add_argument("--out", required=True)
    args, config = parse_args_with_config(parser, "configs/demo_fashion.py", argv)
    need = {"nll": ("models", "tokens"), "fid": ("models", "samples", "heldout"), "curve": ("run", "tokens"),
            "reference": ("heldout",), "diagnostics": ("models", "tokens")}[args.what]
    missing = [f"--{k}" for k in need if getattr(args, k) is None]
    if missing:
        raise BadInput(f"{args.what} needs {' '.join(missing)}")
    check_writable(args.out)  # before any work: a path that cannot be written fails now, not after evaluation
    with torch.no_grad():  # evaluation only; scoped, so a caller in the same process keeps its grad mode
        if args.what == "nll":
            run_nll(config, args.models, args.tokens, args.out)
        elif args.what == "fid":
            run_fid(config, args.models, args.samples, args.heldout, args.out, args.reference_features)
        elif args.what == "curve":
            run_curve(config, args.run, args.tokens, args.out)
        elif args.what == "diagnostics":
            run_diagnostics(config, args.models, args.tokens, args.out)
        else:
            run_reference(config, args.heldout, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
