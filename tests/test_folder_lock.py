"""One process per output folder: the OS file lock of libs/folder_lock.py and every writer that takes it."""
import json
import os
import re
import subprocess
import sys

import pytest

from libs.cli import run_main
from libs.errors import BadInput
from libs.folder_lock import LOCK_FILE, FolderBusy, FolderLock
from tests.helpers import REPO, write_training_token_dir

HOLDER = ("import sys, time\n"
          "from libs.folder_lock import FolderLock\n"
          "lock = FolderLock(sys.argv[1]).acquire()\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")


def start_holder(folder) -> subprocess.Popen:
    """A child process that holds `folder`'s lock until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


@pytest.fixture
def holder(tmp_path):
    """(child process holding tmp_path/held, that folder); the child is killed at the end."""
    folder = tmp_path / "held"
    child = start_holder(folder)
    yield child, folder
    child.kill()
    child.wait()


def try_lock_in_child(folder) -> subprocess.CompletedProcess:
    """Another process asking for the lock: exit 0 when it got it, 2 (and the message) when refused."""
    code = ("import sys\nfrom libs.folder_lock import FolderLock, FolderBusy\n"
            "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept FolderBusy as e:\n    print(e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, capture_output=True, text=True)


# ----------------------------------------------------------------------------- the lock


def test_a_live_holder_refuses_others_naming_its_pid_and_its_death_frees_the_folder(holder):
    child, folder = holder
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == child.pid
    with pytest.raises(FolderBusy) as err:
        FolderLock(folder, "run folder").acquire()
    msg = str(err.value)
    assert "\n" not in msg and f"pid {child.pid}" in msg and str(folder) in msg and msg.startswith("run folder")
    child.kill()
    child.wait()
    assert (folder / LOCK_FILE).exists()  # a killed holder leaves its file behind, but no lock
    lock = FolderLock(folder).acquire()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    refused = try_lock_in_child(folder)
    assert refused.returncode == 2 and f"pid {os.getpid()}" in refused.stdout
    lock.release()
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()  # the folder existed before: kept
    assert try_lock_in_child(folder).returncode == 0


def test_the_lock_is_reentrant_in_a_process_and_the_last_release_tidies_up(tmp_path):
    folder = tmp_path / "a" / "b"
    first = FolderLock(folder).acquire()
    second = FolderLock(folder).acquire()  # the same process again (two holders of one run)
    first.release()
    first.release()  # idempotent
    assert try_lock_in_child(folder).returncode == 2  # still held by `second`
    second.release()
    assert not (tmp_path / "a").exists()  # the folders the lock created, empty again, are removed
    with FolderLock(folder) as lock:
        assert lock.held
        (folder / "result.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["result.txt"]  # folders holding outputs stay


def test_a_dropped_handle_releases_its_hold(tmp_path):
    FolderLock(tmp_path / "f").acquire()  # never stored: collected at once
    assert try_lock_in_child(tmp_path / "f").returncode == 0


def test_a_file_where_the_folder_goes_is_one_line_bad_input(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(BadInput, match=r"cannot use --out folder .*out: it exists and is not a folder"):
        FolderLock(tmp_path / "out", "--out folder").acquire()


# ----------------------------------------------------------------------------- every writer takes it


def assert_refused(err_text: str, child, folder):
    """One line `error: ...` naming the folder and the holder's pid."""
    lines = [line for line in err_text.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err_text, err_text[-2000:]
    assert f"pid {child.pid}" in lines[-1] and str(folder) in lines[-1], lines[-1]


def test_train_graph_refuses_a_run_folder_another_process_holds(holder, tmp_path, capsys):
    child, folder = holder  # folder = <output_dir>/<run_name>
    data = write_training_token_dir(tmp_path / "tokens")
    with pytest.raises(SystemExit) as exit_:
        import train_graph
        run_main(train_graph.main, ["--config", "configs/tiny.py", f"--config.data.path={data}",
                                    f"--config.output_dir={folder.parent}", f"--config.run_name={folder.name}",
                                    "--config.train.n_steps=2"])
    assert exit_.value.code == 2
    assert_refused(capsys.readouterr().err, child, folder)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written: no log, no checkpoint


def test_tokenization_refuses_an_out_another_process_holds(holder, tmp_path, capsys):
    import extract_imagenet_feature
    from tests.helpers import make_image_tree
    child, folder = holder
    data = make_image_tree(tmp_path / "data")
    code = extract_imagenet_feature.main(["--path", str(data), "--split", "train", "--out", str(folder),
                                          "--config", "configs/tiny.py", "--config.tokenizer.checkpoint=vq.ckpt",
                                          "--workers", "0", "--device", "cpu"])
    assert code == 2
    assert_refused(capsys.readouterr().err, child, folder)


def test_build_graphs_refuses_a_folder_another_process_holds(holder, tmp_path, capsys):
    from graph_construction import build_graphs
    child, folder = holder
    data = write_training_token_dir(tmp_path / "tokens")
    with pytest.raises(SystemExit) as exit_:
        run_main(build_graphs.main, ["--config", "configs/tiny.py", "--tokens", str(data), "--out", str(folder)])
    assert exit_.value.code == 2
    assert_refused(capsys.readouterr().err, child, folder)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_generate_npz_and_strategy_search_refuse_an_out_another_process_holds(holder, tiny_assets, monkeypatch,
                                                                               capsys):
    import generate_npz
    from libs.sampling import strategy_search
    child, folder = holder
    root, overrides = tiny_assets
    common = ["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "2", "--batch-size", "2", "--device",
              "cpu", "--out", str(folder), *overrides]
    with pytest.raises(SystemExit) as exit_:
        run_main(generate_npz.main, common + ["--no-fid"])
    assert exit_.value.code == 2
    assert_refused(capsys.readouterr().err, child, folder)
    monkeypatch.setattr(strategy_search, "load_reference_stats", lambda *a, **k: None)  # not the point here
    with pytest.raises(SystemExit) as exit_:
        run_main(strategy_search.main, common + ["--ref-stats", "ref.npz", "--iterations", "1"])
    assert exit_.value.code == 2
    assert_refused(capsys.readouterr().err, child, folder)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_torchrun_ranks_share_the_main_process_verdict(holder, tmp_path):
    """Two processes: rank 0 is refused the run folder, rank 1 gets its verdict (one error line, no hang)."""
    child, folder = holder
    data = write_training_token_dir(tmp_path / "tokens")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "train_graph.py", "--config", "configs/tiny.py",
           f"--config.data.path={data}", f"--config.output_dir={folder.parent}", f"--config.run_name={folder.name}",
           "--config.train.n_steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"pid {child.pid}" in errors[0]
    assert re.search(r"exitcode\s*: 2 ", proc.stderr)  # a rank ended as a user error (torchrun's summary)
    assert not re.search(r'File ".*(train_graph\.py|/libs/)', proc.stderr)  # no traceback of ours
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
