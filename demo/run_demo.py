"""`make demo`: KA-MIG against a head-only control and the bare backbone on real images (Fashion-MNIST), on CPU.

    python -m demo.run_demo                            # Fashion-MNIST, configs/demo_fashion.py -> output/demo/
    python -m demo.run_demo --dataset synthetic        # procedural images, configs/demo.py -> output/demo_synthetic/
    python -m demo.run_demo --fashion-mnist DIR        # the idx files from DIR (e.g. torchvision's FashionMNIST/raw)
    python -m demo.run_demo --smoke                    # a tiny run for the tests (configs/demo_*smoke.py)
    python -m demo.run_demo --backbone maskgit         # the MaskGIT host: KA-MaskGIT, control, MaskGIT and
                                                       # shuffled-graph KA-MaskGIT (configs/demo_fashion_maskgit.py)
    python -m demo.run_demo --log-with tensorboard     # also the figures and numbers to output/demo/tb/ (or wandb)
Runs demo.make_data, extract_imagenet_feature.py (train and held-out), graph_construction.build_graphs,
train_graph.py (control and KA-MIG), demo.evaluate nll, generate_npz.py (each model) and demo.evaluate fid as
subprocesses; writes grids, comparison.png, curves.png, metrics.json, summary.txt and logs/ to the output folder.
"""
import argparse

from demo.pipeline import DATASETS, driver_main, load_demo_config, parse_demo_args, run_demo
from demo.report import log_demo
from libs.cli import ArgumentParser
from libs.training.tracking import check_log_with

CONFIGS = {("fashion_mnist", "autonat", False): "configs/demo_fashion.py",
           ("fashion_mnist", "autonat", True): "configs/demo_fashion_smoke.py",
           ("fashion_mnist", "maskgit", False): "configs/demo_fashion_maskgit.py",
           ("fashion_mnist", "maskgit", True): "configs/demo_fashion_maskgit_smoke.py",
           ("synthetic", "autonat", False): "configs/demo.py", ("synthetic", "autonat", True): "configs/demo_smoke.py"}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATASETS),
                        help="fashion_mnist (default) or synthetic (the procedural images); picks the default config")
    parser.add_argument("--backbone", default="autonat", choices=("autonat", "maskgit"),
                        help="the frozen backbone: autonat (default) or maskgit (Fashion-MNIST only); picks the "
                             "default config")
    parser.add_argument("--config", default=None,
                        help="demo config (default configs/demo_fashion.py, configs/demo.py with --dataset synthetic; "
                             "the *_smoke.py ones with --smoke); override any value with --config.<key>=<value>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--out", default=None, help="output folder (default config.output_dir)")
    parser.add_argument("--data", default=None,
                        help="data root for the ImageFolder trees (default config.demo.data_root)")
    parser.add_argument("--assets", default=None, help="folder of the demo weights (default config.demo.assets)")
    parser.add_argument("--fashion-mnist", default=None, metavar="DIR",
                        help="folder with the four Fashion-MNIST idx files, gzipped or not (default: "
                             "/usr/share/datasets/fashion-mnist, else data/fashion-mnist, else fetched with apt-get)")
    args, overrides = parse_demo_args(parser, argv)

    key = (DATASETS[args.dataset], args.backbone, args.smoke)
    if key not in CONFIGS and not args.config:
        parser.error(f"--backbone {args.backbone} has no default config for --dataset {args.dataset} (give --config)")
    config_file = args.config or CONFIGS[key]
    try:
        config = load_demo_config(config_file, overrides)  # unknown keys fail here, before any work
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if e.args else e))
    return driver_main("demo", lambda: logged_demo(args, config_file, overrides, args.out or config.output_dir))


def logged_demo(args, config_file, overrides, out) -> dict:
    """run_demo, then (--log-with) its figures and numbers to the tracker; a missing package stops it first."""
    check_log_with(args.log_with)
    metrics = run_demo(config_file, overrides, out, args.data, args.assets, args.threads, args.fashion_mnist)
    log_demo(args.log_with, metrics)  # after metrics.json and the figures are written
    return metrics


if __name__ == "__main__":
    main()
