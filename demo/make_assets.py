"""`make demo-assets`: rebuilds the committed demo weights in demo/assets/<dataset>/.

    python -m demo.make_assets                       # Fashion-MNIST: configs/demo_fashion*.py -> demo/assets/fashion/
    python -m demo.make_assets --dataset synthetic   # procedural images -> demo/assets/synthetic/
    python -m demo.make_assets --backbone maskgit    # the MaskGIT demo backbone (configs/demo_fashion_maskgit*.py),
                                                     # on the committed Fashion-MNIST tokenizer
    python -m demo.make_assets --assets /tmp/a --config.tokenizer_train.steps=10 --config.train.n_steps=10
Recipe (the repo's own entry points, as subprocesses): demo/make_data.py -> demo/train_tokenizer.py ->
extract_imagenet_feature.py (train and held-out) -> train_graph.py (mode pretrain) -> demo/evaluate.py curve
(held-out NLL of every backbone checkpoint) -> demo/evaluate.py reference (FID reference features). Writes the
weight files, the tokenizer report, the backbone's training log and held-out curve, and manifest.json (sizes,
sha256, losses, times).
"""
import argparse

from demo.pipeline import DATASETS, build_assets, driver_main, load_demo_config, parse_demo_args
from libs.cli import ArgumentParser

CONFIGS = {("fashion_mnist", "autonat"): ("configs/demo_fashion.py", "configs/demo_fashion_backbone.py"),
           ("fashion_mnist", "maskgit"): ("configs/demo_fashion_maskgit.py",
                                          "configs/demo_fashion_maskgit_backbone.py"),
           ("synthetic", "autonat"): ("configs/demo.py", "configs/demo_backbone.py")}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATASETS),
                        help="fashion_mnist (default) or synthetic; picks the default configs")
    parser.add_argument("--backbone", default="autonat", choices=("autonat", "maskgit"),
                        help="the demo backbone to pretrain: autonat (default) or maskgit (Fashion-MNIST only); "
                             "picks the default configs")
    parser.add_argument("--config", default=None, help="demo config (tokenizer sizes and training)")
    parser.add_argument("--backbone-config", default=None, help="backbone pretraining config")
    parser.add_argument("--assets", default=None, help="where the weights go (default config.demo.assets)")
    parser.add_argument("--work", default=None, help="work folder (default output/demo_assets_<dataset>)")
    parser.add_argument("--data", default=None, help="data root (default <config.demo.data_root>_assets)")
    parser.add_argument("--fashion-mnist", default=None, metavar="DIR",
                        help="folder with the four Fashion-MNIST idx files (see demo/fashion_mnist.py)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an earlier run in the work folder: reuse its tokenizer and tokens, resume the "
                             "backbone from its newest checkpoint (e.g. after raising train.n_steps)")
    args, overrides = parse_demo_args(parser, argv)
    dataset = DATASETS[args.dataset]
    if (dataset, args.backbone) not in CONFIGS and not (args.config and args.backbone_config):
        parser.error(f"--backbone {args.backbone} has no default configs for --dataset {args.dataset} (give "
                     f"--config and --backbone-config)")
    config_file = args.config or CONFIGS[dataset, args.backbone][0]
    backbone_file = args.backbone_config or CONFIGS[dataset, args.backbone][1]
    try:
        config = load_demo_config(config_file, overrides)
        load_demo_config(backbone_file, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if e.args else e))
    work = args.work or f"output/demo_assets_{dataset}" + ("_maskgit" if args.backbone == "maskgit" else "")
    return driver_main("demo-assets", lambda: build_assets(
        config_file, backbone_file, overrides, work,
        args.assets or config.demo.assets, args.data, args.threads, args.fashion_mnist, resume=args.resume))


if __name__ == "__main__":
    main()
