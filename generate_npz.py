"""Generate N class-conditional samples (resumable, multi-GPU), pack samples.npz and compute FID.

    torchrun --nproc_per_node=8 generate_npz.py --num-samples 50000 --ref-stats assets/VIRTUAL_imagenet256_labeled.npz
Each sample index has its own seed, so an interrupted run resumed later gives the same images.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from libs.atomic_io import atomic_write
from libs.config import parse_args_with_config
from libs.distributed import Distributed
from libs.evaluation.fid_stats import compute_metrics, load_reference_stats
from libs.evaluation.inception import CONVERTED_CACHE, load_feature_extractor
from libs.models.factory import load_tokenizer_and_model
from libs.sampling.generation import (add_sampling_flags, class_labels, index_generators, pick_device, png_ok,
                                      sample_images, save_png, schedule_from_flags)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser)
    parser.add_argument("--num-samples", "--num", dest="num", type=int, default=50_000,
                        help="number of samples (under torchrun >= 2.14 write --num-samples: torchrun itself "
                             "rejects a bare --num as an abbreviation of its --numa-binding)")
    parser.add_argument("--labels", choices=["balanced", "random"], default="balanced",
                        help="balanced: index i has class i mod C (50 per class for 50K); random: seeded uniform")
    parser.add_argument("--out", default="output/npz", help="output folder (samples/, samples.npz, metrics.json)")
    parser.add_argument("--ref-stats", default="assets/VIRTUAL_imagenet256_labeled.npz",
                        help="reference statistics npz with mu/sigma (ADM's batch or python -m libs.evaluation.fid_stats)")
    parser.add_argument("--inception-weights", default=None,
                        help="pytorch-fid FID weights (default assets/pt_inception-2015-12-05-6726825d.pth, "
                             "else the converted offline TF-Inception port)")
    parser.add_argument("--inception-cache", default=None,
                        help="where the converted offline Inception weights are cached when pt_inception is absent "
                             "(default assets/pt_inception_fid_from_tf_torchscript.pth)")
    parser.add_argument("--no-fid", action="store_true", help="only generate samples and samples.npz")
    parser.add_argument("--stop-after-batches", type=int, default=None,
                        help="testing aid: exit after this many new batches on each rank (simulates a crash)")
    args, config = parse_args_with_config(parser, "configs/ka_mig_l.py", argv)

    dist = Distributed()
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out = Path(args.out)
    sample_dir = out / "samples"
    if not args.no_fid and not Path(args.ref_stats).is_file():
        raise SystemExit(f"reference statistics not found: {args.ref_stats} (make them with "
                         f"`python -m libs.evaluation.fid_stats --images <real images> --out ref.npz` or pass --no-fid)")
    schedule = schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp)
    tokenizer, model = load_tokenizer_and_model(config, args.model, args.checkpoint, device,
                                                cpu_kernels=args.cpu_kernels)
    labels = class_labels(args.num, config.model.num_classes, args.labels, args.seed)
    batches = [np.arange(s, min(s + args.batch_size, args.num)) for s in range(0, args.num, args.batch_size)]
    mine = batches[dist.rank::dist.world]  # fixed global batches, round robin over ranks
    todo = [b for b in mine if not all(png_ok(sample_dir / f"{i:06d}.png") for i in b)]
    if dist.is_main:
        print(f"{args.num} samples in {len(batches)} batches over {dist.world} processes; "
              f"{len(mine) - len(todo)} of rank 0's {len(mine)} batches already done")
    t0 = time.time()
    for n, idx in enumerate(tqdm(todo, desc="sampling", disable=not dist.is_main)):
        if args.stop_after_batches is not None and n >= args.stop_after_batches:
            raise SystemExit(f"rank {dist.rank}: stopping after {n} batches as asked (--stop-after-batches)")
        cls = torch.as_tensor(labels[idx], device=device)
        images = sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                               args.precision)
        for i, img in zip(idx, images):
            save_png(sample_dir / f"{i:06d}.png", img)
    sampling_s = time.time() - t0
    dist.barrier()  # every rank's PNGs are written before rank 0 reads them
    if dist.is_main:
        missing = [i for i in range(args.num) if not png_ok(sample_dir / f"{i:06d}.png")]
        if missing:
            raise SystemExit(f"{len(missing)} samples are missing or unreadable (first {missing[:5]}); rerun")
        first = np.asarray(Image.open(sample_dir / "000000.png").convert("RGB"))
        arr = np.empty((args.num, *first.shape), dtype=np.uint8)
        for i in tqdm(range(args.num), desc="samples.npz"):
            arr[i] = np.asarray(Image.open(sample_dir / f"{i:06d}.png").convert("RGB"))

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arr, labels=labels.astype(np.int64))
        atomic_write(out / "samples.npz", write_npz)
        print(f"wrote {out / 'samples.npz'} {arr.shape}")
        if not args.no_fid:
            extractor = load_feature_extractor(args.inception_weights, cache=args.inception_cache or CONVERTED_CACHE,
                                               device=device)
            ref = load_reference_stats(args.ref_stats, extractor=extractor)
            result = compute_metrics(arr, ref, extractor, num_expected=args.num, batch_size=args.batch_size)
            result.update(model=args.model, checkpoint=args.checkpoint, seed=args.seed, labels=args.labels,
                          schedule=vars(schedule), autocast=args.precision, sampling_seconds=sampling_s,
                          world_size=dist.world)
            text = json.dumps(result, indent=1, default=float)
            atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
            print(f"FID {result['fid']:.4f} ({args.num} samples) -> {out / 'metrics.json'}")
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main()
