"""Trains the demo's small VQGAN tokenizer (libs.models.vqgan.VQGAN, config.tokenizer sizes) on an ImageFolder split.

    python -m demo.train_tokenizer        # data/demo/train -> demo/assets/synthetic/vqgan_demo.safetensors
    python -m demo.train_tokenizer --data data/demo/train --out /tmp/vq.safetensors --config.tokenizer_train.steps=100
Writes the weights as .safetensors (atomic, byte-reproducible; loads with libs.models.factory.load_tokenizer) with
{"tokenizer", "train"} (the model's config and the training settings) as JSON under the metadata key 'config', and
<out>.json with the loss log and the reconstruction error before / after training.
"""
import argparse
from pathlib import Path

from demo.tokenizer_training import run_tokenizer_training
from libs.cli import ArgumentParser, run_main
from libs.config import parse_args_with_config


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="ImageFolder split to train on (default <demo.data_root>/train)")
    parser.add_argument("--val", default=None,
                        help="ImageFolder split for the reported reconstruction error (default <demo.data_root>/val "
                             "when it exists)")
    parser.add_argument("--out", default=None, help="weights file (default config.tokenizer.checkpoint)")
    args, config = parse_args_with_config(parser, "configs/demo.py", argv)

    data = Path(args.data or Path(config.demo.data_root) / "train")
    val = Path(args.val) if args.val else Path(config.demo.data_root) / "val"
    return run_tokenizer_training(config, data, val if (args.val or val.is_dir()) else None,
                                  Path(args.out or config.tokenizer.checkpoint))


if __name__ == "__main__":
    run_main(main)
