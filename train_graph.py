"""Train KA-MIG's graph modules on a frozen AutoNAT backbone (or pretrain a backbone).

    torchrun --nproc_per_node=8 train_graph.py                       # paper recipe (configs/ka_mig_l.py)
    python train_graph.py --config configs/tiny.py --config.data.path <tokens>   # one CPU process
    Mixed precision: ACCELERATE_MIXED_PRECISION=fp16|bf16|no or --config.train.mixed_precision.
"""
import argparse
import os

from libs.config import parse_args_with_config
from libs.data.tokens import load_tokens
from libs.training.periodic_fid import periodic_fid
from libs.training.trainer import Trainer

PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # accelerate's own variable; overrides train.mixed_precision


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crash-after-step", type=int, default=None,
                        help="testing aid: SIGKILL every process right after this step (and its checkpoint)")
    args, config = parse_args_with_config(parser, "configs/ka_mig_l.py", argv)

    if os.environ.get(PRECISION_ENV):
        with config.train.unlocked():
            config.train.mixed_precision = os.environ[PRECISION_ENV]
        print(f"{PRECISION_ENV}={config.train.mixed_precision}: overrides config.train.mixed_precision")
    try:
        tokens, labels, meta = load_tokens(config.data.path, codebook_size=config.model.codebook_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if tokens.shape[1] != config.model.seq_len:
        raise SystemExit(f"token dataset {config.data.path} has {tokens.shape[1]} tokens per image but the model "
                         f"expects {config.model.seq_len}")
    if int(labels.max()) >= config.model.num_classes:
        raise SystemExit(f"token dataset has class id {int(labels.max())} but the model has "
                         f"{config.model.num_classes} classes")
    trainer = Trainer(config, tokens, labels)
    eval_fn = periodic_fid if config.train.fid_interval > 0 else None
    trainer.fit(eval_fn=eval_fn, crash_after_step=args.crash_after_step)


if __name__ == "__main__":
    main()
