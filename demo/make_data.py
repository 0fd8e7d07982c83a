"""Writes the demo's ImageFolder trees <out>/train/<class>/*.png and <out>/<held-out split>/<class>/*.png.

    python -m demo.make_data --config configs/demo_fashion.py       # Fashion-MNIST -> data/demo_fashion/{train,test}
    python -m demo.make_data                                        # procedural images -> data/demo/{train,val}
    python -m demo.make_data --config configs/demo_fashion.py --fashion-mnist ~/torchvision/FashionMNIST/raw
The source is config.demo.source: "fashion_mnist" (demo/fashion_mnist.py: found on disk or fetched with
`apt-get download`, a subset of demo.train_per_class images per class, demo.heldout_per_class test images per
class, seeds demo.data_seed and demo.data_seed + 1) or "synthetic" (demo/procedural_data.py, same sizes).
Exit status 2 with one line `error: ...` when Fashion-MNIST cannot be found or read.
"""
import argparse
from pathlib import Path

from demo.fashion_mnist import locate_idx_folder, write_fashion_splits
from demo.procedural_data import write_demo_splits
from libs.cli import ArgumentParser, run_main
from libs.config import parse_args_with_config

SOURCES = ("synthetic", "fashion_mnist")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="data root (default config.demo.data_root)")
    parser.add_argument("--fashion-mnist", default=None, metavar="DIR",
                        help="folder with the four Fashion-MNIST idx files, gzipped or not (default "
                             "config.demo.fashion_mnist, else /usr/share/datasets/fashion-mnist, else fetched)")
    args, config = parse_args_with_config(parser, "configs/demo.py", argv)
    d = config.demo
    out = Path(args.out or d.data_root)
    per_class = {"train": d.train_per_class, d.heldout_split: d.heldout_per_class}
    if d.source == "synthetic":
        return write_demo_splits(out, list(per_class), num_classes=config.model.num_classes,
                                 resolution=config.tokenizer.resolution, seed=d.data_seed, per_class=per_class)
    if d.source == "fashion_mnist":
        if config.model.num_classes != 10 or config.tokenizer.resolution != 32:
            raise ValueError("Fashion-MNIST has 10 classes of 32x32 (padded) images: set model.num_classes=10 "
                             "and tokenizer.resolution=32")
        folder = locate_idx_folder(args.fashion_mnist or d.fashion_mnist or None, cache=d.fashion_mnist_cache)
        print(f"Fashion-MNIST idx files: {folder}")
        return write_fashion_splits(out, folder, per_class, seed=d.data_seed)
    raise ValueError(f"unknown config.demo.source '{d.source}' (one of {', '.join(SOURCES)})")


if __name__ == "__main__":
    run_main(main)
