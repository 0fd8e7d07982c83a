"""Provenance of generated samples: a fingerprint of everything that determines them, kept next to them.

A sampling run writes `fingerprint.json` into its output folder before the first sample:

    {"fingerprint": {...}, "files": {...}}

`fingerprint` holds what decides the pixels: the sampler version (SAMPLER_VERSION, bumped whenever the
sampling arithmetic changes), model kind, sha256 of the checkpoint, the tokenizer checkpoint and the graph
files the model uses, the decoding schedule with its parameters, seed, label mode and a hash of the labels,
the image count, autocast precision, CPU kernels, device type, pixel quantisation, and the model /
tokenizer / graph config blocks. Settings added later appear only when they are not at their default, so
earlier fingerprints stay valid: `compile` (true with --compile), and in the schedule `guidance_schedule` /
`guidance_power` (maskgit, when not 'linear'), `guidance_steps` (when not 'all') and `order` (when not
'confidence'). An editing run (generate_img.py --edit) adds `edit`: the input image's sha256, the mask (box, or
the mask PNG's sha256), the class and the number of regenerated tokens. `files` only records where the inputs
were found (paths, for the reader).

A rerun into the same folder compares fingerprints before sampling: the same fingerprint resumes the run;
another one stops with a one-line error listing the fields that differ (`--overwrite` deletes the old samples
and the fingerprint first, or another output folder starts fresh). Every input file is hashed on every run
(no cache: about a second per GB), so a file rewritten in place is always seen.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from libs.atomic_io import atomic_write_json
from libs.checkpoint import file_sha256
from libs.config import config_to_dict, flatten_config
from libs.errors import BadInput
from libs.graphs.files import graph_paths
from libs.models.factory import GRAPH_KINDS

SAMPLER_VERSION = 1  # bump when the arithmetic from (weights, settings) to pixels changes
FINGERPRINT_FILE = "fingerprint.json"
NOT_SAMPLING_KEYS = ("use_checkpoint",)  # config.model keys that change training memory, never samples


# ----------------------------------------------------------------------------- label hashes


def labels_sha256(labels) -> str:
    """sha256 of the labels as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels), dtype="<i8").tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the fingerprint


def schedule_record(config, schedule) -> dict:
    """The decoding schedule as plain values: its name, per-step lists, and the MaskGIT parameters."""
    sample = config.sample
    record = {"name": sample.schedule, "ratios": [float(x) for x in schedule.ratios],
              "conf_temps": [float(x) for x in schedule.conf_temps],
              "sample_temps": [float(x) for x in schedule.sample_temps],
              "guidance": [float(x) for x in schedule.guidance],
              "ratio_dtype": str(schedule.ratio_dtype).replace("torch.", "")}
    if sample.schedule == "maskgit":
        record.update(steps=int(sample.steps), cfg_scale=float(sample.cfg_scale), temp=float(sample.temp))
        # settings added later appear only when they differ from the behaviour before them, so that earlier
        # fingerprints (and generate_img.py folder names) stay valid
        kind = sample.get("guidance_schedule", "linear")
        if kind != "linear":
            record.update(guidance_schedule=kind, guidance_power=float(sample.get("guidance_power", 1.0)))
    if str(sample.get("guidance_steps", "all")).strip().lower() != "all":
        record["guidance_steps"] = str(sample.guidance_steps)
    if getattr(schedule, "order", "confidence") != "confidence":
        record["order"] = schedule.order
    return record


def sampling_fingerprint(config, *, kind: str, checkpoint, schedule, seed: int, label_mode: str, labels,
                         precision: str, cpu_kernels: str, pixels: str, device, compile: bool = False,
                         tokenizer_sha256: str = None) -> dict:
    """What decides a set of samples (see the module docstring); every input file is hashed.

    `compile` (torch.compile of the token model) is recorded only when on (`"compile": true`);
    `tokenizer_sha256`: the tokenizer checkpoint's sha256 when already computed (else it is hashed here)."""
    graphs = None
    if kind in GRAPH_KINDS:
        paths = graph_paths(config.graph.dir)
        used = {"co": config.graph.use_co, "sim": config.graph.use_sim, "incompat": config.graph.use_incompat}
        graphs = {name: file_sha256(paths[name]) for name, on in used.items() if on}
    tokenizer_cfg = {k: v for k, v in config_to_dict(config.tokenizer).items() if k != "checkpoint"}
    graph_cfg = None
    if kind in GRAPH_KINDS:
        graph_cfg = {k: config.graph[k] for k in ("use_co", "use_sim", "use_incompat", "gcn_layers")}
    fingerprint = {
        "sampler_version": SAMPLER_VERSION,
        "model": kind,
        "checkpoint_sha256": file_sha256(checkpoint),
        "tokenizer_sha256": tokenizer_sha256 or file_sha256(config.tokenizer.checkpoint),
        "graphs_sha256": graphs,
        "schedule": schedule_record(config, schedule),
        "seed": int(seed),
        "labels": {"mode": label_mode, "count": int(len(labels)), "sha256": labels_sha256(labels)},
        "num_images": int(len(labels)),
        "precision": precision,
        "cpu_kernels": cpu_kernels,
        "device": getattr(device, "type", str(device)),
        "pixels": pixels,
        "model_config": {k: v for k, v in config_to_dict(config.model).items() if k not in NOT_SAMPLING_KEYS},
        "tokenizer_config": tokenizer_cfg,
        "graph_config": graph_cfg,
    }
    if compile:
        fingerprint["compile"] = True
    return json.loads(json.dumps(fingerprint))  # plain JSON values, as read back from the file


def input_files(config, kind: str, checkpoint) -> dict:
    """Where the hashed inputs were read from (recorded beside the fingerprint, never compared)."""
    files = {"checkpoint": str(checkpoint), "tokenizer": str(config.tokenizer.checkpoint)}
    if kind in GRAPH_KINDS:
        files["graph_dir"] = str(config.graph.dir)
    return files


def fingerprint_id(fingerprint: dict, length: int = 10) -> str:
    """A short stable hash of a fingerprint (names output folders)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    if isinstance(value, list) and len(text) > 40:
        return f"[{len(value)} values: {', '.join(json.dumps(v) for v in value[:2])}, ...]"
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint_diff(old: dict, new: dict) -> list:
    """['field: old -> new', ...] for every (dotted) field whose value differs."""
    a, b = flatten_config(old or {}), flatten_config(new or {})
    return [f"{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def read_fingerprint(folder):
    """The fingerprint stored in folder/fingerprint.json, None if there is none; BadInput if unreadable."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is unreadable ({type(e).__name__}); pass --overwrite to start fresh "
                       f"(deletes the samples in {folder}) or choose another output folder") from e


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _nonempty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def claim_folder(folder, fingerprint: dict, managed, *, overwrite: bool, files: dict = None,
                 flag: str = "--out") -> str:
    """Makes `folder` hold samples of `fingerprint` (one process; run it on rank 0 before anyone samples).

    `managed`: the outputs of a run in the folder (samples folder, npz, metrics). With `overwrite` they and
    the fingerprint are deleted first. Otherwise a stored fingerprint must equal `fingerprint` ('resume'),
    and a folder with outputs but no fingerprint is refused. Returns 'new' or 'resume'; raises BadInput.
    """
    folder = Path(folder)
    managed = [Path(p) for p in managed]
    fresh = (f"to start fresh pass --overwrite (deletes {', '.join(str(p) for p in managed)} and "
             f"{folder / FINGERPRINT_FILE}) or choose another {flag}")
    status = "new"
    if overwrite:
        for p in managed + [folder / FINGERPRINT_FILE]:
            _remove(p)
    else:
        old = read_fingerprint(folder)
        if old is not None:
            diff = fingerprint_diff(old, fingerprint)
            if diff:
                raise BadInput(f"{folder} holds samples made with other settings (fingerprint.json differs in "
                               f"{len(diff)} field(s): {'; '.join(diff)}); {fresh}")
            status = "resume"
        else:
            left = [str(p) for p in managed if _nonempty(p)]
            if left:
                raise BadInput(f"{folder} holds outputs of an earlier run without a fingerprint.json ({', '.join(left)}); "
                               f"their settings are unknown; {fresh}")
    atomic_write_json(folder / FINGERPRINT_FILE, {"fingerprint": fingerprint, "files": files or {}})
    return status


def claim_folder_all_ranks(dist, folder, fingerprint: dict, managed, *, overwrite: bool, files: dict = None,
                           flag: str = "--out") -> str:
    """`claim_folder` on rank 0; every rank returns its status or raises its BadInput (no rank left waiting)."""
    result = None
    if dist.is_main:
        try:
            result = ("ok", claim_folder(folder, fingerprint, managed, overwrite=overwrite, files=files, flag=flag))
        except BadInput as e:
            result = ("error", str(e))
    kind, value = dist.broadcast(result)
    if kind == "error":
        raise BadInput(value)
    return value
