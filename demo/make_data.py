"""Writes the demo's procedural ImageFolder trees <out>/train/<class>/*.png and <out>/val/<class>/*.png.

    python -m demo.make_data                      # data/demo/{train,val} with configs/demo.py sizes
    python -m demo.make_data --out /tmp/d --config.demo.train_per_class=20
Classes, image size and seeds come from the config (model.num_classes, tokenizer.resolution,
demo.data_seed for train, demo.data_seed + 1 for the held-out val split); see demo/procedural_data.py.
"""
import argparse
from pathlib import Path

from demo.procedural_data import write_demo_splits
from libs.config import parse_args_with_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="data root (default config.demo.data_root)")
    parser.add_argument("--splits", default="train,val", help="comma list of train,val")
    args, config = parse_args_with_config(parser, "configs/demo.py", argv)

    out = Path(args.out or config.demo.data_root)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    return write_demo_splits(out, splits, num_classes=config.model.num_classes,
                             resolution=config.tokenizer.resolution, seed=config.demo.data_seed,
                             per_class={"train": config.demo.train_per_class, "val": config.demo.val_per_class})


if __name__ == "__main__":
    main()
