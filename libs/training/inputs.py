"""What a training run reads, fingerprinted: its token dataset and graph files, recorded with the run.

`training_inputs(config)` gives, for each file training reads, its size in bytes and the sha256 of its content
(hashed anew on every start, about a second per GB, like the sampling fingerprint of
libs/sampling/provenance.py):

    {"tokens": {"tokens.npy": {"size": ..., "sha256": ...}, "labels.npy": {...}},
     "graphs": {"co": {"file": "codebook_co_occurrence_norm_self_50.pkl", "size": ..., "sha256": ...}, ...}}

`tokens` holds the two arrays of a token dataset folder (meta.json only describes them), or the paper's single
.npy file; `graphs` holds the graph files a ka_mig run uses (`config.graph.use_*`), none in pretrain mode. No
path is recorded (the config holds them), so the same run in another folder stores the same fingerprint.
The trainer stores it in every checkpoint and in the run folder, and refuses to resume when it changed.
"""
import os
from pathlib import Path

from libs.checkpoint import file_sha256
from libs.data.tokens import LABELS_FILE, TOKENS_FILE
from libs.graphs.files import graph_paths

GRAPH_NAMES = {"co": "G_co", "sim": "G_s", "incompat": "G_p"}  # graph key -> the paper's name
USE_FLAGS = {"co": "use_co", "sim": "use_sim", "incompat": "use_incompat"}  # graph key -> config.graph flag


def file_record(path) -> dict:
    """{'size': bytes, 'sha256': hex digest} of one file."""
    return {"size": os.path.getsize(path), "sha256": file_sha256(path)}


def token_files(data_path) -> list:
    """The files of a token dataset that training reads: tokens.npy and labels.npy, or the paper's .npy."""
    data = Path(data_path)
    return [data] if data.is_file() else [data / TOKENS_FILE, data / LABELS_FILE]


def used_graphs(config) -> list:
    """Graph keys ('co', 'sim', 'incompat') a run of `config` reads: those switched on, in ka_mig mode."""
    if config.train.mode != "ka_mig":
        return []
    return [name for name, flag in USE_FLAGS.items() if config.graph.get(flag, True)]


def training_inputs(config) -> dict:
    """The fingerprint of the token dataset at config.data.path and the graph files the run uses (see the
    module docstring); files that are absent are left out (their loaders report them)."""
    tokens = {p.name: file_record(p) for p in token_files(config.data.path) if p.is_file()}
    used = used_graphs(config)
    paths = graph_paths(config.graph.dir) if used else {}  # a pretraining config may have no graph block
    graphs = {name: {"file": paths[name].name, **file_record(paths[name])}
              for name in used if paths[name].is_file()}
    return {"tokens": tokens, "graphs": graphs}


def _file_change(name, old, new) -> str:
    """'tokens.npy (sha256 1a2b3c4d5e6f -> ..., 2048 -> 1536 bytes)' for one changed file record."""
    if old is None:
        return f"{name} (new)"
    if new is None:
        return f"{name} (gone)"
    sizes = f", {old.get('size')} -> {new.get('size')} bytes" if old.get("size") != new.get("size") else ""
    return f"{name} (sha256 {str(old.get('sha256'))[:12]} -> {str(new.get('sha256'))[:12]}{sizes})"


def _graph_change(name, old, new) -> str:
    """'G_s codebook_replace_graph_norm_self.pkl (sha256 ... -> ...)' for one changed graph record."""
    file = (new or old).get("file", name)
    return f"{GRAPH_NAMES.get(name, name)} {_file_change(file, old, new)}"


def input_changes(old: dict, new: dict, config) -> list:
    """One phrase per changed input between two fingerprints, naming where it is read from; [] if none."""
    changes = []
    old_tokens, new_tokens = old.get("tokens") or {}, new.get("tokens") or {}
    files = [_file_change(n, old_tokens.get(n), new_tokens.get(n))
             for n in sorted(set(old_tokens) | set(new_tokens)) if old_tokens.get(n) != new_tokens.get(n)]
    if files:
        changes.append(f"the token dataset {config.data.path} ({', '.join(files)})")
    old_graphs, new_graphs = old.get("graphs") or {}, new.get("graphs") or {}
    graphs = [_graph_change(n, old_graphs.get(n), new_graphs.get(n))
              for n in sorted(set(old_graphs) | set(new_graphs)) if old_graphs.get(n) != new_graphs.get(n)]
    if graphs:
        changes.append(f"the graphs in {config.graph.dir} ({', '.join(graphs)})")
    return changes
