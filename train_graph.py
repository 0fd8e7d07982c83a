"""Train KA-MIG's graph modules on a frozen AutoNAT backbone (or pretrain a backbone); on MaskGIT with a MaskGIT
config (KA-MaskGIT, configs/ka_maskgit.py).

    torchrun --nproc_per_node=8 train_graph.py                       # paper recipe (configs/ka_mig_l.py)
    torchrun --nproc_per_node=8 train_graph.py --config configs/ka_maskgit.py   # KA on the frozen MaskGIT
    python train_graph.py --config configs/tiny.py --config.data.path <tokens>   # one CPU process
    Mixed precision: ACCELERATE_MIXED_PRECISION=fp16|bf16|no or --config.train.mixed_precision.

Rerunning the same command resumes from the newest readable checkpoint of output/<run_name>/ (its config
must match; see RESUME_MAY_CHANGE in libs/training/trainer.py for the keys that may change). The run records a
fingerprint of its token dataset and graph files (sha256 and size; inputs.json and every checkpoint); a resume
after either changed stops naming what changed, unless --allow-input-change is given (then it is logged). One
process per run folder: a second train_graph.py on the same folder stops at once naming the first one's pid.
Exit status:
0 done, 1 training diverged (a non-finite loss, gradient norm or weight; nothing non-finite was written),
2 a problem with the input (one line `error: ...`).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from libs.checkpoint import file_sha256
from libs.cli import ArgumentParser, run_main
from libs.config import parse_args_with_config
from libs.config_schema import check_config
from libs.data.tokens import META_FILE, load_tokens_for_model
from libs.errors import BadInput, MissingInput, UserError, one_line
from libs.graphs.files import check_graph_tokenizer
from libs.training.inputs import training_inputs, used_graphs
from libs.training.periodic_fid import check_periodic_fid_inputs, periodic_fid
from libs.training.trainer import NonFiniteError, Trainer

PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # accelerate's own variable; overrides train.mixed_precision
DIVERGED = 1  # exit status of a run stopped by a non-finite value


def load_training_tokens(config):
    """(tokens [N,L], labels [N]) of config.data.path, checked against the model and made by the tokenizer the
    graphs' tokens were made with (ka_mig mode) and periodic FID decodes with, where both sides record one;
    MissingInput / BadInput."""
    tokens, labels, meta = load_tokens_for_model(config.data.path, config.model)
    recorded, source = meta.get("tokenizer_sha256"), f"token dataset {Path(config.data.path) / META_FILE}"
    used = used_graphs(config)
    if used:
        check_graph_tokenizer(config.graph.dir, used, recorded, source)  # paper .npy: "" (none)
    check_fid_tokenizer(config, recorded, source)
    return tokens, labels


def check_fid_tokenizer(config, recorded: str, source: str):
    """BadInput when periodic FID is on and config.tokenizer.checkpoint is not the tokenizer (sha256 `recorded`)
    that made the training tokens; nothing without a record or a file (check_periodic_fid_inputs tells)."""
    checkpoint = config.tokenizer.get("checkpoint") if "tokenizer" in config else None
    if config.train.fid_interval <= 0 or not recorded or not checkpoint or not Path(checkpoint).is_file():
        return
    sha = file_sha256(checkpoint)
    if sha != recorded:
        raise BadInput(f"periodic FID would decode with tokenizer checkpoint {checkpoint} (config.tokenizer."
                       f"checkpoint, sha256 {sha[:12]}) but {source} records tokens of tokenizer sha256 "
                       f"{recorded[:12]}: set config.tokenizer.checkpoint to the tokenizer that made the tokens")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crash-after-step", type=int, default=None,
                        help="testing aid: SIGKILL every process right after this step (and its checkpoint)")
    parser.add_argument("--allow-input-change", action="store_true",
                        help="resume even if the token dataset or graph files changed since the checkpoint "
                             "(sha256 fingerprint); the change is logged (default: stop and name it)")
    args, config = parse_args_with_config(parser, "configs/ka_mig_l.py", argv)

    if os.environ.get(PRECISION_ENV):
        with config.train.unlocked():
            config.train.mixed_precision = os.environ[PRECISION_ENV]
        check_config(config, what="the training config", only="train.mixed_precision",
                     sources={"train.mixed_precision": PRECISION_ENV})
        print(f"{PRECISION_ENV}={config.train.mixed_precision}: overrides config.train.mixed_precision")
    tokens, labels = load_training_tokens(config)
    if config.train.fid_interval > 0:
        check_periodic_fid_inputs(config)  # tokenizer and reference statistics, before the first step
    try:
        trainer = Trainer(config, tokens, labels, inputs=lambda: training_inputs(config),
                          allow_input_change=args.allow_input_change)
    except BaseException:
        # refused at start (e.g. the run folder is held by another run): the process group accelerate created
        # goes down here too, or gloo's threads can abort this rank at interpreter shutdown
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    eval_fn = periodic_fid if config.train.fid_interval > 0 else None
    try:
        trainer.fit(eval_fn=eval_fn, crash_after_step=args.crash_after_step)
    except NonFiniteError as e:
        if trainer.accelerator.is_main_process:
            print(f"error: training stopped: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(DIVERGED) from None  # also when main() is called from Python
    finally:
        # tear the torchrun process group down before the interpreter exits: left to interpreter shutdown, gloo's
        # threads can abort a rank ("terminate called without an active exception") after a finished run
        trainer.close()
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_main(main)
