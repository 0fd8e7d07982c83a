"""Training that never loses work: non-finite stops, fp16 overflow skips, pruning next to unreadable
checkpoints, the config check on resume, logs without duplicates, byte-identical checkpoints, exit codes."""
import csv
import hashlib

import pytest
import torch
from safetensors.torch import load_file
from accelerate.optimizer import AcceleratedOptimizer

import train_graph
from libs.cli import run_main
from libs.errors import BadInput
from libs.training import trainer as trainer_module
from libs.training.trainer import (NonFiniteError, RESUME_MAY_CHANGE, Trainer, config_changes, list_checkpoints,
                                   prune_checkpoints)
from tests.helpers import ka_mig_trainer, synthetic_tokens, tiny_config, write_training_token_dir


def pretrain_trainer(tmp_path, **train):
    config = tiny_config(tmp_path, **train)
    tokens, labels = synthetic_tokens()
    return Trainer(config, tokens, labels)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- non-finite values


def huge_lr_from(step0, monkeypatch):
    lr_at = trainer_module.lr_at
    monkeypatch.setattr(trainer_module, "lr_at", lambda step, base, warmup: 1e30 if step >= step0
                        else lr_at(step, base, warmup))


def test_nan_loss_stops_keeps_the_finite_checkpoint_and_writes_nothing_non_finite(tmp_path, monkeypatch):
    train = dict(n_steps=30, save_interval=10, keep_checkpoints=2)
    healthy = pretrain_trainer(tmp_path, **train)
    healthy.fit(stop_after=10)
    huge_lr_from(10, monkeypatch)
    run = pretrain_trainer(tmp_path, **train)
    with pytest.raises(NonFiniteError, match=r"step 1[1-9]: non-finite loss") as err:
        run.fit()
    assert "step_0000010.pt" in str(err.value)  # names the last (finite) checkpoint
    assert [p.name for p in list_checkpoints(run.ckpt_dir)] == ["step_0000010.pt"]
    state = torch.load(run.ckpt_dir / "step_0000010.pt", weights_only=True)
    assert all_finite(state["model"]) and all_finite(state["ema"])
    assert not (run.run_dir / "model_ema.safetensors").exists()


def test_a_non_finite_loss_is_never_applied(tmp_path, monkeypatch):
    run = pretrain_trainer(tmp_path, n_steps=10, save_interval=100)
    loss_fn = trainer_module.masked_token_loss
    calls = {"n": 0}

    def loss_nan_at_third_step(logits, batch, smoothing):
        calls["n"] += 1
        loss = loss_fn(logits, batch, smoothing)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_module, "masked_token_loss", loss_nan_at_third_step)
    run.train_step()
    run.train_step()
    before = run.trained_state()
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss"):
        run.train_step()
    after = run.trained_state()
    assert run.step == 2 and all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_weights_are_never_saved(tmp_path):
    run = pretrain_trainer(tmp_path, n_steps=4, save_interval=2)
    run.fit(stop_after=2)
    with torch.no_grad():
        next(p for n, p in run.unwrapped.named_parameters() if n in run.trained_set).fill_(float("inf"))
    run.step = 4
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        run.save_checkpoint()
    assert [p.name for p in list_checkpoints(run.ckpt_dir)] == ["step_0000002.pt"]


def test_train_graph_exits_1_with_one_line_on_divergence_and_2_on_user_errors(tmp_path, monkeypatch, capsys):
    data = write_training_token_dir(tmp_path / "tokens")
    args = ["--config", "configs/tiny.py", f"--config.data.path={data}", f"--config.output_dir={tmp_path / 'out'}",
            "--config.train.n_steps=6", "--config.train.save_interval=3"]
    huge_lr_from(2, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        run_main(train_graph.main, args)
    assert exit_.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite" in err[0] and "step " in err[0]
    assert not (tmp_path / "out" / "tiny" / "model_ema.safetensors").exists()

    for bad, expected in (([f"--config.data.path={tmp_path / 'nowhere'}"], "token dataset not found"),
                          (["--config.model.seq_len=9"], "tokens per image")):
        with pytest.raises(SystemExit) as exit_:
            run_main(train_graph.main, args + bad)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and expected in err[-1] and "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------- fp16 loss scaler


def with_cpu_loss_scaler(trainer, init_scale=2.0 ** 8):
    """What accelerate sets up for fp16 on a GPU, on the CPU: a GradScaler seen by backward and step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.scaler = scaler
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    return scaler


def overflow_at(trainer, steps):
    """Gradients of one parameter become inf at the given (1-based) steps."""
    p = next(p for n, p in trainer.unwrapped.named_parameters() if n in trainer.trained_set)
    p.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.step + 1 in steps else g)


def test_fp16_overflow_skips_are_counted_and_logged(tmp_path):
    run = pretrain_trainer(tmp_path, n_steps=8, save_interval=4, log_interval=1)
    scaler = with_cpu_loss_scaler(run)
    overflow_at(run, {3, 5, 6})
    run.fit()
    assert run.step == 8 and run.skipped_total == 3 and run.skipped_run == 0
    assert scaler.get_scale() < 2.0 ** 8  # every skip halved the scale
    rows = read_log(run.run_dir / "log.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 1, 1, 2, 3, 3, 3]
    state = torch.load(run.ckpt_dir / "step_0000008.pt", weights_only=True)
    assert state["skipped_steps"] == {"total": 3, "in_a_row": 0} and state["scaler"] is not None
    assert all_finite(load_file(run.run_dir / "model_ema.safetensors"))


def test_fp16_stops_when_the_scaler_gives_up(tmp_path):
    run = pretrain_trainer(tmp_path, n_steps=10, save_interval=2, max_skipped_steps=2)
    with_cpu_loss_scaler(run)
    overflow_at(run, set(range(3, 11)))
    with pytest.raises(NonFiniteError, match=r"step 5: .*skipped 3 steps in a row.*max_skipped_steps = 2"):
        run.fit()
    assert [p.name for p in list_checkpoints(run.ckpt_dir)][0] == "step_0000004.pt"
    assert all_finite(torch.load(run.ckpt_dir / "step_0000004.pt", weights_only=True)["model"])


# ----------------------------------------------------------------------------- pruning


def test_an_unreadable_newer_checkpoint_never_displaces_fresh_ones(tmp_path, capsys):
    first = pretrain_trainer(tmp_path, n_steps=4, save_interval=2, keep_checkpoints=1)
    first.fit()
    newest = first.ckpt_dir / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: unreadable
    again = pretrain_trainer(tmp_path, n_steps=4, save_interval=2, keep_checkpoints=1)
    again.fit(stop_after=2)  # restarts from step 0 (nothing readable), saves step 2
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "step_0000004.pt.unreadable" in out
    names = sorted(p.name for p in again.ckpt_dir.iterdir())
    assert names == ["step_0000002.pt", "step_0000004.pt.unreadable"]
    third = pretrain_trainer(tmp_path, n_steps=4, save_interval=2, keep_checkpoints=1)
    assert third.resume() == 2


def test_prune_keeps_the_new_checkpoint_and_ignores_higher_steps(tmp_path):
    for step in (2, 4, 6, 9):
        (tmp_path / f"step_{step:07d}.pt").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, tmp_path / "step_0000006.pt", keep=2)
    assert sorted(p.name for p in removed) == ["step_0000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004.pt", "step_0000006.pt", "step_0000009.pt"]
    prune_checkpoints(tmp_path, tmp_path / "step_0000006.pt", keep=0)  # keep <= 0 still keeps the new one
    assert (tmp_path / "step_0000006.pt").exists()


# ----------------------------------------------------------------------------- config check on resume


def test_resume_refuses_a_changed_config_naming_keys_values_and_checkpoint(tmp_path):
    first = pretrain_trainer(tmp_path, n_steps=4, save_interval=2)
    first.fit(stop_after=2)
    changed = pretrain_trainer(tmp_path, n_steps=4, save_interval=2, lr=0.5, batch_size=32)
    with pytest.raises(BadInput) as err:
        changed.fit()
    msg = str(err.value)
    assert "\n" not in msg
    assert "train.lr: checkpoint 0.001, now 0.5" in msg and "train.batch_size: checkpoint 16, now 32" in msg
    assert "step_0000002.pt" in msg and "run_name" in msg and "output_dir" in msg
    assert not list(changed.run_dir.glob("config_resume_*.json"))
    assert '"lr": 0.001' in (changed.run_dir / "config.json").read_text()


def test_resume_refuses_a_shape_change_by_its_config_key(tmp_path):
    trainer, _ = ka_mig_trainer(tmp_path, n_steps=4, save_interval=2)
    trainer.fit(stop_after=2)
    config = tiny_config(tmp_path, "ka_mig", n_steps=4, save_interval=2)
    config.graph.use_co = False
    config.train.init_checkpoint = trainer.config.train.init_checkpoint
    from tests.helpers import tiny_graphs
    tokens, labels = synthetic_tokens()
    other = Trainer(config, tokens, labels, graphs=tiny_graphs())
    with pytest.raises(BadInput, match=r"graph\.use_co: checkpoint True, now False"):
        other.fit()


def test_allowed_changes_resume_with_a_log_line_and_every_segment_keeps_its_config(tmp_path, capsys):
    first = pretrain_trainer(tmp_path, n_steps=4, save_interval=2)
    first.fit(stop_after=2)
    longer = pretrain_trainer(tmp_path, n_steps=6, save_interval=3, log_interval=2, keep_checkpoints=5,
                              fid_samples=10, max_skipped_steps=3)
    assert longer.fit() == 6
    out = capsys.readouterr().out
    assert "resumed from" in out and "changed settings" in out and "train.n_steps 4 -> 6" in out
    assert '"n_steps": 4' in (longer.run_dir / "config.json").read_text()
    assert '"n_steps": 6' in (longer.run_dir / "config_resume_0000002.json").read_text()


def test_resume_rules_live_in_one_allow_list():
    allowed, refused, unrecorded = config_changes(
        {"train": {"n_steps": 4, "fid_samples": 5, "lr": 1.0, "gone": 1}, "seed": 1},
        {"train": {"n_steps": 8, "fid_samples": 50, "lr": 2.0, "new_key": 3}, "seed": 1, "output_dir": "x"})
    assert [k for k, _, _ in allowed] == ["train.fid_samples", "train.n_steps"]
    assert refused == [("train.gone", 1, "(absent)"), ("train.lr", 1.0, 2.0)]
    assert [k for k, _, _ in unrecorded] == ["train.new_key"]
    assert "train.n_steps" in RESUME_MAY_CHANGE and "train.fid_*" in RESUME_MAY_CHANGE


# ----------------------------------------------------------------------------- logs and bytes


def test_resumed_log_equals_the_uninterrupted_one(tmp_path):
    full = pretrain_trainer(tmp_path / "full", n_steps=6, save_interval=3, log_interval=1)
    full.fit()
    part = pretrain_trainer(tmp_path / "part", n_steps=6, save_interval=3, log_interval=1)
    part.fit(stop_after=5)  # rows 1..5 logged, last checkpoint at step 3: rows 4 and 5 are redone
    rest = pretrain_trainer(tmp_path / "part", n_steps=6, save_interval=3, log_interval=1)
    rest.fit()
    a, b = read_log(full.run_dir / "log.csv"), read_log(rest.run_dir / "log.csv")
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5", "6"]
    timing = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]


def test_checkpoints_and_ema_are_byte_identical_across_runs_and_resumes(tmp_path):
    from tests.helpers import tiny_backbone, tiny_graphs
    backbone = tmp_path / "backbone.pth"
    torch.save(tiny_backbone(depth=2).state_dict(), backbone)
    tokens, labels = synthetic_tokens()

    def ka_mig(folder):  # the same run (same backbone file) in another output folder
        config = tiny_config(folder, "ka_mig", n_steps=6, save_interval=3, keep_checkpoints=5)
        config.train.init_checkpoint = str(backbone)
        return Trainer(config, tokens, labels, graphs=tiny_graphs())

    runs = {}
    for name in ("a", "b"):
        t = ka_mig(tmp_path / name)
        t.fit()
        runs[name] = t.run_dir
    ka_mig(tmp_path / "c").fit(stop_after=4)
    resumed = ka_mig(tmp_path / "c")
    resumed.fit()
    runs["resumed"] = resumed.run_dir
    for f in ("checkpoints/step_0000003.pt", "checkpoints/step_0000006.pt", "model_ema.safetensors"):
        digests = {name: sha256(d / f) for name, d in runs.items()}
        assert len(set(digests.values())) == 1, (f, digests)


# ----------------------------------------------------------------------------- logs grow by appends


def test_append_csv_appends_in_place_and_a_cut_line_never_merges_with_the_next(tmp_path):
    from libs.training.trainer import append_csv, read_csv, truncate_csv
    log = tmp_path / "log.csv"
    append_csv(log, {"step": 1, "loss": 0.5})
    inode, first = log.stat().st_ino, log.read_bytes()
    append_csv(log, {"step": 2, "loss": 0.25})
    assert log.stat().st_ino == inode and log.read_bytes() == first + b"2,0.25\n"  # appended, not rewritten
    with open(log, "a") as f:
        f.write("3,0.1")  # a row cut by a crash: no newline
    assert [r["step"] for r in read_csv(log)[1]] == ["1", "2"]
    append_csv(log, {"step": 3, "loss": 0.125})
    assert log.read_text() == "step,loss\n1,0.5\n2,0.25\n3,0.125\n" and log.stat().st_ino == inode
    append_csv(log, {"step": 4, "loss": 0.0, "fid": 9.5})  # a new column: the one rewrite
    assert log.read_text() == "step,loss,fid\n1,0.5,\n2,0.25,\n3,0.125,\n4,0.0,9.5\n"
    with open(log, "a") as f:
        f.write("5,0.")
    truncate_csv(log, 10)  # nothing to cut but the unfinished line
    assert log.read_text() == "step,loss,fid\n1,0.5,\n2,0.25,\n3,0.125,\n4,0.0,9.5\n"
    truncate_csv(log, 2)
    assert log.read_text() == "step,loss,fid\n1,0.5,\n2,0.25,\n"


# ----------------------------------------------------------------------------- inputs checked on resume


def ka_mig_args(tiny_assets, tmp_path, n_steps, *extra):
    """train_graph.py flags of a tiny KA-MIG run on tmp_path/tokens and tmp_path/graphs."""
    root, overrides = tiny_assets
    overrides = [o for o in overrides if not o.startswith("--config.graph.dir=")]
    return [*overrides, f"--config.graph.dir={tmp_path / 'graphs'}", f"--config.data.path={tmp_path / 'tokens'}",
            f"--config.output_dir={tmp_path / 'out'}", "--config.train.mode=ka_mig",
            f"--config.train.init_checkpoint={root / 'backbone.pth'}", f"--config.train.n_steps={n_steps}",
            "--config.train.save_interval=2", *extra]


def fingerprint_of(tmp_path) -> dict:
    """The expected record: sha256 and size of the two token arrays and the three graph files."""
    from libs.graphs.files import graph_paths

    def record(path):
        return {"size": path.stat().st_size, "sha256": sha256(path)}
    graphs = graph_paths(tmp_path / "graphs")
    return {"tokens": {name: record(tmp_path / "tokens" / name) for name in ("tokens.npy", "labels.npy")},
            "graphs": {name: {"file": graphs[name].name, **record(graphs[name])} for name in ("co", "sim", "incompat")}}


def train_exit(args, capsys):
    """(exit status of train_graph.py with args, its stdout, its stderr lines)."""
    with pytest.raises(SystemExit) as exit_:
        run_main(train_graph.main, args)
    out, err = capsys.readouterr()
    return exit_.value.code, out, [line for line in err.splitlines() if line.strip()]


def test_resume_refuses_changed_graphs_or_tokens_naming_them_unless_allowed(tiny_assets, tmp_path, capsys):
    import json
    import shutil
    from libs.graphs.files import graph_paths, load_edge_graph, save_edge_graph
    root, _ = tiny_assets
    shutil.copytree(root / "graphs", tmp_path / "graphs")
    write_training_token_dir(tmp_path / "tokens")
    run_dir = tmp_path / "out" / "tiny"
    assert train_exit(ka_mig_args(tiny_assets, tmp_path, 2), capsys)[0] == 0
    before = fingerprint_of(tmp_path)
    assert json.loads((run_dir / "inputs.json").read_text()) == before
    assert torch.load(run_dir / "checkpoints" / "step_0000002.pt", weights_only=True)["inputs"] == before

    # the graph folder rebuilt with another G_s: refused, naming that graph only
    sim = graph_paths(tmp_path / "graphs")["sim"]
    edge_index, edge_weight, _ = load_edge_graph(graph_paths(tmp_path / "graphs")["co"])
    save_edge_graph(sim, edge_index, edge_weight, meta={"codebook_size": 32})
    code, _, err = train_exit(ka_mig_args(tiny_assets, tmp_path, 4), capsys)
    assert code == 2 and err[-1].startswith("error: cannot resume from") and "step_0000002.pt" in err[-1]
    assert f"the graphs in {tmp_path / 'graphs'} (G_s {sim.name} (sha256 {before['graphs']['sim']['sha256'][:12]}" \
        in err[-1] and "G_co" not in err[-1] and "token dataset" not in err[-1] and "--allow-input-change" in err[-1]
    assert not list(run_dir.glob("*_resume_*.json")) and not (run_dir / "checkpoints" / "step_0000004.pt").exists()
    shutil.rmtree(tmp_path / "graphs")
    shutil.copytree(root / "graphs", tmp_path / "graphs")  # the graphs back as they were

    # the token dataset replaced (fewer rows): refused, naming both arrays
    shutil.rmtree(tmp_path / "tokens")
    write_training_token_dir(tmp_path / "tokens", n=384)
    code, _, err = train_exit(ka_mig_args(tiny_assets, tmp_path, 4), capsys)
    assert code == 2 and f"the token dataset {tmp_path / 'tokens'} (labels.npy (sha256" in err[-1]
    assert "tokens.npy (sha256" in err[-1] and "graphs in" not in err[-1]

    # allowed by the flag: logged, and the new fingerprint recorded for the rest of the run
    code, out, _ = train_exit(ka_mig_args(tiny_assets, tmp_path, 4, "--allow-input-change"), capsys)
    after = fingerprint_of(tmp_path)
    assert code == 0 and "warning: resuming on changed inputs" in out and "token dataset" in out
    assert json.loads((run_dir / "inputs_resume_0000002.json").read_text()) == after != before
    assert json.loads((run_dir / "inputs.json").read_text()) == before
    assert torch.load(run_dir / "checkpoints" / "step_0000004.pt", weights_only=True)["inputs"] == after
