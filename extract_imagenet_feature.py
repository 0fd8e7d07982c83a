"""Tokenizes an ImageFolder split (data/<split>/<class>/*.JPEG) into a token dataset (docs/reference.md#tokenizer).

  python extract_imagenet_feature.py --path data --split train
  torchrun --nproc_per_node=8 extract_imagenet_feature.py --path data --split train --device cuda

Output (default assets/imagenet256_vq_features/<split>/): tokens.npy, labels.npy, meta.json; see
libs/data/tokens.py. Rerunning the same command resumes an interrupted run (finished chunks are kept).
Images are read by libs.data.images.read_image (no EXIF rotation; 16-bit images scaled by their declared
depth); unreadable entries (corrupt, empty, not an image, symlink loops, permission denied) are skipped,
logged and listed in meta.json under "skipped". A user error ends with one line `error: ...`, exit status 2.
"""
import argparse
import logging
import os
import sys

from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import parse_args_with_config
from libs.data.tokens import PARTIAL_DIR, StopRequested, extract_token_dataset
from libs.devices import check_device
from libs.distributed import Distributed
from libs.errors import BadInput, UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (the config file and --config.* overrides are added by parse_args_with_config)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="root of the ImageFolder tree (holds <split>/<class>/...)")
    p.add_argument("--split", default="train", help="sub-folder of --path to tokenize (default train)")
    p.add_argument("--out", default=None,
                   help="output directory (default assets/imagenet256_vq_features/<split>)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also store each image's horizontal flip (default: only on the train split)")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer forward (per process)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (per process)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per resumable chunk; chunks are fixed slices of the sorted file list")
    p.add_argument("--overwrite", action="store_true", help="discard an existing dataset / partial results")
    p.add_argument("--keep-partial", action="store_true", help="keep the per-chunk files after merging")
    p.add_argument("--stop-after-chunks", type=int, default=0,
                   help="testing aid: exit with status 3 after writing this many chunks (simulated crash)")
    return p


def main(argv=None) -> int:
    """Parses flags, tokenizes the split, returns a process exit status (2 after a one-line user error)."""
    try:
        args, config = parse_args_with_config(build_parser(), "configs/ka_mig_l.py", argv)
        for flag in ("batch_size", "chunk_size"):
            if getattr(args, flag) < 1:
                raise BadInput(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if args.workers < 0:
            raise BadInput(f"--workers must be 0 or more, got {args.workers}")
        if args.stop_after_chunks < 0:
            raise BadInput(f"--stop-after-chunks must be 0 (off) or a chunk count, got {args.stop_after_chunks}")
        if not config.tokenizer.checkpoint:
            raise BadInput("no tokenizer checkpoint: set --config.tokenizer.checkpoint=<file>")
        check_device(args.device)  # 'gpu', 'cuda:99', cuda without a GPU: one line, not a traceback
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    dist = Distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"[tokenize{f' rank {dist.rank}' if dist.world > 1 else ''}] %(message)s")
    device = dist.device(args.device)  # a bare cuda is cuda:<LOCAL_RANK>, the GPU of this rank on its node
    out = args.out or os.path.join("assets", "imagenet256_vq_features", args.split)
    flip = (args.split == "train") if args.flip is None else args.flip
    try:
        # before the tokenizer is built or a chunk computed; one rank probes (it creates and removes folders)
        dist.on_main(check_writable, folders=[out, os.path.join(out, PARTIAL_DIR)])
        extract_token_dataset(os.path.join(args.path, args.split), out, config.tokenizer, flip=flip,
                              batch_size=args.batch_size, workers=args.workers, device=device,
                              chunk_size=args.chunk_size, overwrite=args.overwrite,
                              keep_partial=args.keep_partial, stop_after_chunks=args.stop_after_chunks, dist=dist)
    except StopRequested as e:
        logging.getLogger("token_dataset").error("%s", e)
        return 3
    except UserError as e:
        if not getattr(e, "reported_elsewhere", False):  # rank 0 printed the verdict of its check already
            print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    run_main(main)
