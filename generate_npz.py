"""Generate N class-conditional samples (resumable, multi-GPU), pack samples.npz and compute FID.

    torchrun --nproc_per_node=8 generate_npz.py --num-samples 50000 --ref-stats assets/VIRTUAL_imagenet256_labeled.npz
    (--config configs/ka_maskgit.py --checkpoint <run>/model_ema.safetensors: KA-MaskGIT with the MaskGIT sampler;
     --config configs/maskgit.py: the bare MaskGIT)

Each sample index has its own seed, so an interrupted run resumed later gives the same images. Before the
first sample the run checks its inputs (reference statistics: keys, shapes, 2048-d, finite values; every
output path writable) and writes --out/fingerprint.json: everything that determines the samples (model,
checkpoint / tokenizer / graph hashes, schedule, seed, labels, count, precision, CPU kernels, compilation,
pixel quantisation, configs, sampler version). The decoding strategy comes from the config, a --strategy
file (e.g. one written by `python -m libs.sampling.strategy_search`) and the schedule flags, in that order.
Rerunning into the same --out resumes only when that fingerprint is the same; otherwise it stops and names
the differing fields (--overwrite deletes the old samples and starts fresh). samples.npz holds the images
(arr_0), the label of each (labels) and the fingerprint; metrics.json repeats the fingerprint. A user error
ends with one line `error: ...`, exit status 2. Logits that turn NaN/inf (e.g. an fp16 overflow) stop the run
with one line naming the decoding step, the precision and what to try, exit status 1 (as a diverged training
run): the PNGs of that batch are not written and samples.npz is not packed; earlier batches' PNGs are kept.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import atomic_savez, atomic_write_json
from libs.checkpoint import require_file
from libs.cli import ArgumentParser, check_writable, run_main
from libs.config import parse_args_with_config
from libs.data.images import UnreadableImage, read_rgb
from libs.distributed import Distributed
from libs.errors import BadInput, UserError
from libs.folder_lock import FolderLock
from libs.evaluation.fid_stats import compute_metrics, load_reference_stats
from libs.evaluation.inception import CONVERTED_CACHE, FEATURE_DIM, load_feature_extractor
from libs.models.factory import DEFAULT_CHECKPOINTS, load_tokenizer_and_model
from libs.sampling.generation import (add_sampling_flags, check_graphs_tokenizer, check_inputs, class_labels,
                                      compile_token_model, index_generators, png_ok, sample_images, save_png,
                                      schedule_args, schedule_from_flags)
from libs.sampling.provenance import claim_folder_all_ranks, input_files, sampling_fingerprint


def build_parser():
    """Flags (the config file and --config.* overrides are added by parse_with_config)."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(parser)
    parser.add_argument("--num-samples", "--num", dest="num", type=int, default=50_000,
                        help="number of samples (under torchrun >= 2.14 write --num-samples: torchrun itself "
                             "rejects a bare --num as an abbreviation of its --numa-binding)")
    parser.add_argument("--labels", choices=["balanced", "random"], default="balanced",
                        help="balanced: index i has class i mod C (50 per class for 50K); random: seeded uniform")
    parser.add_argument("--out", default="output/npz",
                        help="output folder (samples/, samples.npz, metrics.json, fingerprint.json)")
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
    return parser


def output_paths(out: Path) -> dict:
    """The files and folder a run writes under --out."""
    return {"samples": out / "samples", "npz": out / "samples.npz", "metrics": out / "metrics.json",
            "fingerprint": out / "fingerprint.json"}


def main(argv=None):
    """Checks inputs and outputs, then samples (see the module docstring)."""
    args, config = parse_args_with_config(build_parser(), "configs/ka_mig_l.py", argv)
    if args.num < 1:
        raise BadInput(f"--num-samples must be at least 1, got {args.num}")
    pixels = check_inputs(args, config)
    schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp, **schedule_args(args))  # checked now
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS[args.model]
    out = Path(args.out)
    paths = output_paths(out)

    dist = Distributed()
    lock = FolderLock(out, "--out folder", "or choose another --out")
    try:
        lock.acquire_on_main(dist)  # one process per --out (rank 0 holds the lock): a second run stops here
        # everything that can be checked without sampling is checked before the first sample
        if not args.no_fid:
            load_reference_stats(args.ref_stats, dims=FEATURE_DIM)  # keys, shapes, 2048-d, finite values
            if args.inception_weights:
                require_file(args.inception_weights)
        # the probe creates and removes folders: one rank runs it, the others wait for its verdict
        dist.on_main(check_writable, paths["npz"], paths["metrics"], paths["fingerprint"],
                     folders=[paths["samples"]])
        run(args, config, dist, checkpoint, pixels, paths)
    finally:
        lock.release()
        dist.close()


def run(args, config, dist, checkpoint, pixels, paths):
    """Models, fingerprint check, this rank's batches; then rank 0 packs and evaluates."""
    device = dist.device(args.device)  # a bare cuda is cuda:<LOCAL_RANK>, the GPU of this rank on its node
    sample_dir = paths["samples"]
    schedule = schedule_from_flags(config, args.schedule, args.steps, args.cfg, args.temp, **schedule_args(args))
    tokenizer_sha = check_graphs_tokenizer(config, args.model)  # hashed once, reused by the fingerprint
    tokenizer, model = load_tokenizer_and_model(config, args.model, checkpoint, device,
                                                cpu_kernels=args.cpu_kernels)
    if args.compile:
        compile_token_model(model)
    labels = class_labels(args.num, config.model.num_classes, args.labels, args.seed)
    fingerprint = None
    if dist.is_main:
        fingerprint = sampling_fingerprint(config, kind=args.model, checkpoint=checkpoint, schedule=schedule,
                                           seed=args.seed, label_mode=args.labels, labels=labels,
                                           precision=args.precision, cpu_kernels=args.cpu_kernels, pixels=pixels,
                                           device=device, compile=args.compile, tokenizer_sha256=tokenizer_sha)
    fingerprint = dist.broadcast(fingerprint)
    files = input_files(config, args.model, checkpoint)
    if args.strategy:
        files["strategy"] = str(args.strategy)
    status = claim_folder_all_ranks(dist, paths["samples"].parent, fingerprint,
                                    [paths["samples"], paths["npz"], paths["metrics"]], overwrite=args.overwrite,
                                    files=files)
    batches = [np.arange(s, min(s + args.batch_size, args.num)) for s in range(0, args.num, args.batch_size)]
    mine = batches[dist.rank::dist.world]  # fixed global batches, round robin over ranks
    todo = [b for b in mine if not all(png_ok(sample_dir / f"{i:06d}.png") for i in b)]
    if dist.is_main:
        print(f"{args.num} samples in {len(batches)} batches over {dist.world} processes; "
              f"{len(mine) - len(todo)} of rank 0's {len(mine)} batches already done"
              f"{' (resumed: same fingerprint)' if status == 'resume' else ''}")
    t0 = time.time()
    for n, idx in enumerate(tqdm(todo, desc="sampling", disable=not dist.is_main)):
        if args.stop_after_batches is not None and n >= args.stop_after_batches:
            raise SystemExit(f"rank {dist.rank}: stopping after {n} batches as asked (--stop-after-batches)")
        cls = torch.as_tensor(labels[idx], device=device)
        images = sample_images(model, tokenizer, cls, schedule, index_generators(idx, args.seed, device),
                               args.precision, pixels=pixels)
        for i, img in zip(idx, images):
            save_png(sample_dir / f"{i:06d}.png", img)
    sampling_s = time.time() - t0
    dist.barrier()  # every rank's PNGs are written before rank 0 reads them
    if dist.is_main:
        pack_and_evaluate(args, paths, labels, fingerprint, checkpoint, device, sampling_s, dist.world)
    dist.barrier()


def read_sample(path) -> np.ndarray:
    """uint8 [H,W,3] of a saved sample; a user error naming it if it cannot be read back."""
    try:
        return read_rgb(path)
    except UnreadableImage as e:
        raise UserError(f"sample {e.path} became unreadable ({e.reason}); rerun the same command to redo it") from e


def pack_and_evaluate(args, paths, labels, fingerprint, checkpoint, device, sampling_s, world):
    """Rank 0: samples.npz (images, their labels, the fingerprint), then FID into metrics.json."""
    sample_dir = paths["samples"]
    missing = [i for i in range(args.num) if not (sample_dir / f"{i:06d}.png").is_file()]
    if missing:
        raise UserError(f"{len(missing)} samples are missing in {sample_dir} (first {missing[:5]}); rerun the same "
                        "command to produce them")
    first = read_sample(sample_dir / "000000.png")
    arr = np.empty((args.num, *first.shape), dtype=np.uint8)
    for i in tqdm(range(args.num), desc="samples.npz"):
        arr[i] = read_sample(sample_dir / f"{i:06d}.png")
    fingerprint_text = json.dumps(fingerprint, sort_keys=True)
    atomic_savez(paths["npz"], {"arr_0": arr, "labels": np.asarray(labels, dtype=np.int64),
                                "fingerprint": np.asarray(fingerprint_text)})
    print(f"wrote {paths['npz']} {arr.shape} with the label of every image")
    if args.no_fid:
        return
    extractor = load_feature_extractor(args.inception_weights, cache=args.inception_cache or CONVERTED_CACHE,
                                       device=device)
    ref = load_reference_stats(args.ref_stats, extractor=extractor, dims=FEATURE_DIM)  # + features of arr_0
    result = compute_metrics(arr, ref, extractor, num_expected=args.num, batch_size=args.batch_size)
    result.update(model=args.model, checkpoint=str(checkpoint), seed=args.seed, labels=args.labels,
                  schedule=fingerprint["schedule"], autocast=args.precision, pixels=fingerprint["pixels"],
                  sampling_seconds=sampling_s, world_size=world, fingerprint=fingerprint)
    atomic_write_json(paths["metrics"], json.loads(json.dumps(result, default=float)), indent=1, sort_keys=False)
    print(f"FID {result['fid']:.4f} ({args.num} samples) -> {paths['metrics']}")


if __name__ == "__main__":
    run_main(main)
