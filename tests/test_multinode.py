"""Two nodes on one machine: torchrun --nnodes 2 --nproc_per_node 1 (c10d rendezvous on localhost, and a static one
with --node_rank for the resume; gloo) runs tokenization, generate_npz.py and training killed after 2 steps and
resumed; the results are the bytes of one node's run, shared files are written by global rank 0 only, and devices
follow LOCAL_RANK (not RANK)."""
import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import extract_imagenet_feature
import generate_npz
from libs.config import load_config_file
from libs.data.tokens import PARTIAL_DIR
from libs.distributed import Distributed, rank_device
from libs.models.factory import tokenizer_config
from libs.models.vqgan import VQGAN
from tests.helpers import make_image_tree, write_training_token_dir

REPO = Path(__file__).resolve().parents[1]
RECORDER_LOG = "KA_MIG_TEST_WRITE_LOG"
LAUNCH = "KA_MIG_TEST_LAUNCH"

# Runs a script as __main__ after wrapping os.replace (every atomic write ends with it) and open() in append mode
# (logs that grow by rows), so that each write records the writer's RANK, LOCAL_RANK and launch; further lines
# record that the process started and that the script ended with status 0.
RECORDER = f'''
import builtins, os, runpy, sys
who = f"{{os.environ['RANK']}} {{os.environ['LOCAL_RANK']}} {{os.environ['{LAUNCH}']}}"
record = open(os.path.join(os.environ["{RECORDER_LOG}"], f"{{os.getpid()}}.txt"), "a")
def note(what):
    record.write(f"{{who}} {{what}}\\n")
    record.flush()
note("start")
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    note(os.path.abspath(dst))
os.replace = replace
real_open = builtins.open
def open_(file, mode="r", *args, **kwargs):
    if "a" in mode and isinstance(file, (str, os.PathLike)):
        note(os.path.abspath(file))
    return real_open(file, mode, *args, **kwargs)
builtins.open = open_
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
note("done")
'''


# ----------------------------------------------------------------------------- device selection


@pytest.mark.parametrize("rank, local_rank, name, expected", [
    (1, 0, "cuda", "cuda:0"),     # second node's first process: its node's GPU 0, not GPU 1
    (3, 1, "cuda", "cuda:1"),
    (0, 0, "cuda", "cuda:0"),
    (5, 1, "cuda:0", "cuda:0"),   # an explicit index is kept
    (1, 0, "cpu", "cpu"),
])
def test_device_follows_local_rank_not_rank(monkeypatch, rank, local_rank, name, expected):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group is created
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    dist = Distributed()
    assert (dist.rank, dist.local_rank, dist.is_main) == (rank, local_rank, rank == 0)
    device = dist.device(name)
    assert device == torch.device(expected)
    assert chosen == ([device] if device.type == "cuda" else [])


def test_default_device_is_this_nodes_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device(None, 2) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None, 2) == torch.device("cpu")


# ----------------------------------------------------------------------------- two nodes


def free_ports(n: int) -> list:
    """n distinct free TCP ports on localhost (all held open until each is known)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Launch:
    """`nnodes` torchrun launches of `nproc` processes each, started at once on this machine, every process under
    the recorder: a c10d rendezvous (node ranks assigned by arrival), or static (--node_rank, --master_port)."""

    def __init__(self, folder: Path, name: str, args, port: int, nnodes=2, nproc=1, static=False):
        self.folder, self.name, self.procs = folder, name, []
        recorder, logs = folder / "recorder.py", folder / "writes" / name
        recorder.write_text(RECORDER)
        logs.mkdir(parents=True)
        for node in range(nnodes):
            rendezvous = ([f"--node_rank={node}", "--master_addr=localhost", f"--master_port={port}"] if static else
                          ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id={name}"])
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
                   *rendezvous, str(recorder), *map(str, args)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{RECORDER_LOG: str(logs),
                                                                                LAUNCH: str(node)})
            out = open(folder / f"{name}_node{node}.log", "w+")  # a file, not a pipe: no process blocks on it
            self.procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True), out))

    def wait(self, timeout=300) -> list:
        """[(exit status, output)] of each launch (all killed after `timeout` seconds)."""
        results = []
        for proc, out in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other, _ in self.procs:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
                proc.wait()
            out.seek(0)
            results.append((proc.returncode, out.read()))
            out.close()
        return results

    def succeed(self) -> str:
        """Waits; asserts that every launch exited with 0; returns their output."""
        results = self.wait()
        for node, (status, output) in enumerate(results):
            assert status == 0, f"{self.name} node {node}:\n{output[-3000:]}"
        return "\n".join(output for _, output in results)

    def records(self) -> tuple:
        """({(rank, local rank, launch): finished?} of every process, {path: [(rank, local rank, launch) per write]})."""
        done, written = {}, {}
        for log in (self.folder / "writes" / self.name).glob("*.txt"):
            for line in log.read_text().splitlines():
                rank, local, node, what = line.split(" ", 3)
                who = (int(rank), int(local), int(node))
                if what in ("start", "done"):
                    done[who] = what == "done"
                else:
                    written.setdefault(Path(what), []).append(who)
        return done, written


def check_two_nodes(done: dict, finished=True, static=False):
    """Two processes ran, (RANK, LOCAL_RANK) = (0, 0) and (1, 0), one per launch (static: launch i is node i and
    holds RANK i), and each finished (or not)."""
    assert sorted((rank, local) for rank, local, _ in done) == [(0, 0), (1, 0)], done
    assert len({node for _, _, node in done}) == 2, done
    if static:
        assert all(rank == node for rank, _, node in done), done
    assert all(ok == finished for ok in done.values()), done


def check_writers(written: dict, folder: Path, owned=lambda path: False):
    """Under `folder`: each file a rank owns (`owned(path)`: its samples, its token chunks) was written once;
    every other file (logs, checkpoints, merged outputs) by global rank 0 only, never by rank 1 (LOCAL_RANK 0)."""
    here = {path: who for path, who in written.items() if path.is_relative_to(folder)}
    assert here, f"nothing written under {folder}"
    for path, who in here.items():
        if owned(path):
            assert len(who) == 1, (path, who)
        else:
            assert {rank for rank, _, _ in who} == {0}, (path, who)


def same_bytes(a: Path, b: Path, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def train_args(root, overrides, data, out):
    """train_graph.py in ka_mig mode on the tiny assets: 4 steps of 8, a checkpoint every 2, a log row every step."""
    return ["train_graph.py", *overrides, f"--config.data.path={data}", "--config.train.mode=ka_mig",
            f"--config.train.init_checkpoint={root / 'backbone.pth'}", "--config.train.n_steps=4",
            "--config.train.save_interval=2", "--config.train.log_interval=1", "--config.train.batch_size=8",
            f"--config.output_dir={out}"]


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """Two nodes of one process each: tokenize, sample, train until a kill after step 2 (c10d rendezvous, started
    together with the reference training on one node of 2 processes), then resume the training (static
    rendezvous); the tokenize and sample references run in this process meanwhile."""
    root, overrides = tiny_assets
    work = tmp_path_factory.mktemp("multinode")
    data = write_training_token_dir(work / "train_tokens")
    torch.manual_seed(0)
    vq = VQGAN(tokenizer_config(load_config_file("configs/tiny.py").tokenizer)).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(0.4)  # codebook near the encoder's scale: varied ids
    torch.save(vq.state_dict(), work / "vq.pt")
    tokenize = ["--path", make_image_tree(work / "images"), "--split", "train", "--config", "configs/tiny.py",
                f"--config.tokenizer.checkpoint={work / 'vq.pt'}", "--chunk-size", "2", "--batch-size", "3",
                "--workers", "0", "--device", "cpu"]
    sample = ["--checkpoint", root / "ka_mig.pth", "--num-samples", "10", "--batch-size", "3", "--no-fid",
              "--device", "cpu", *overrides]
    two = train_args(root, overrides, data, work / "train_two")
    ports = free_ports(5)
    launches = {"one_node": Launch(work, "one_node", train_args(root, overrides, data, work / "train_one"), ports[0],
                                   nnodes=1, nproc=2),
                "tokenize": Launch(work, "tokenize", ["extract_imagenet_feature.py", *tokenize, "--out",
                                                      work / "tok_two"], ports[1]),
                "sample": Launch(work, "sample", ["generate_npz.py", *sample, "--out", work / "npz_two"], ports[2]),
                "crash": Launch(work, "crash", [*two, "--crash-after-step=2"], ports[3])}
    assert extract_imagenet_feature.main([*map(str, tokenize), "--out", str(work / "tok_one")]) == 0
    generate_npz.main([*map(str, sample), "--out", str(work / "npz_one")])
    for name in ("one_node", "tokenize", "sample"):
        launches[name].succeed()
    assert all(status != 0 for status, _ in launches["crash"].wait())  # killed after step 2
    launches["resume"] = Launch(work, "resume", two, ports[4], static=True)
    launches["resume"].output = launches["resume"].succeed()
    return work, launches


def test_two_nodes_tokenize_like_one_process(runs):
    """extract_imagenet_feature.py on two nodes: one process's bytes; each rank writes its own token chunks
    (both do), rank 0 the merged files."""
    work, launches = runs
    done, written = launches["tokenize"].records()
    check_two_nodes(done)
    same_bytes(work / "tok_one", work / "tok_two", ["tokens.npy", "labels.npy", "meta.json"])
    chunk = lambda path: path.parent.name == PARTIAL_DIR
    check_writers(written, work / "tok_two", owned=chunk)
    assert {who[0][0] for path, who in written.items() if chunk(path)} == {0, 1}


def test_two_nodes_sample_like_one_process(runs):
    """generate_npz.py on two nodes: one process's bytes; each rank writes the PNGs of its batches (batches of 3,
    round robin over ranks), rank 0 samples.npz and fingerprint.json."""
    work, launches = runs
    done, written = launches["sample"].records()
    check_two_nodes(done)
    one, two = work / "npz_one", work / "npz_two"
    pngs = [f"samples/{i:06d}.png" for i in range(10)]
    same_bytes(one, two, ["samples.npz", "fingerprint.json", *pngs])
    check_writers(written, two, owned=lambda path: path.suffix == ".png")
    assert [written[two / png][0][0] for png in pngs] == [(i // 3) % 2 for i in range(10)]
    assert {two / "samples.npz", two / "fingerprint.json"} <= set(written)


def test_two_nodes_train_killed_and_resumed_like_one_node(runs):
    """ka_mig training on two nodes, killed after step 2 and resumed, gives one node's uninterrupted run of 2
    processes (training randomness is per rank, so the reference has 2 ranks too): the same checkpoint and EMA
    bytes and log rows; only rank 0 writes into the run folder."""
    work, launches = runs
    crash_done, crash_written = launches["crash"].records()
    check_two_nodes(crash_done, finished=False)
    done, written = launches["resume"].records()
    check_two_nodes(done, static=True)
    assert "resumed from" in launches["resume"].output
    one, two = work / "train_one" / "tiny", work / "train_two" / "tiny"
    same_bytes(one, two, ["model_ema.safetensors", "checkpoints/step_0000002.pt", "checkpoints/step_0000004.pt"])
    rows = [list(csv.DictReader(open(run / "log.csv"))) for run in (one, two)]
    for row in rows[0] + rows[1]:
        row.pop("tokens_per_s")  # a timing
    assert len(rows[0]) == 4 and rows[0] == rows[1]
    check_writers(crash_written, two)
    check_writers(written, two)
    assert two / "checkpoints" / "step_0000002.pt" in crash_written
    assert {two / "model_ema.safetensors", two / "checkpoints" / "step_0000004.pt"} <= set(written)
