"""`make demo-assets`: rebuilds the committed demo weights demo/assets/{vqgan_demo.pth,autonat_demo.pth}.

    python -m demo.make_assets                    # configs/demo.py + configs/demo_backbone.py -> demo/assets/
    python -m demo.make_assets --assets /tmp/a --config.tokenizer_train.steps=10 --config.train.n_steps=10
Recipe (the repo's own entry points, as subprocesses): demo/make_data.py -> demo/train_tokenizer.py ->
extract_imagenet_feature.py -> train_graph.py (mode pretrain, configs/demo_backbone.py). Writes the two
weight files, the tokenizer report, the backbone's training log and manifest.json (sizes, sha256, losses, times).
"""
import argparse
import sys

from demo.pipeline import StageFailed, build_assets, load_demo_config, parse_demo_args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py", help="demo config (tokenizer sizes and training)")
    parser.add_argument("--backbone-config", default="configs/demo_backbone.py", help="backbone pretraining config")
    parser.add_argument("--assets", default=None, help="where the weights go (default config.demo.assets)")
    parser.add_argument("--work", default="output/demo_assets", help="work folder (tokens, checkpoints, logs)")
    parser.add_argument("--data", default=None, help="data root (default config.demo.data_root)")
    args, overrides = parse_demo_args(parser, argv)

    try:
        config = load_demo_config(args.config, overrides)
        load_demo_config(args.backbone_config, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if e.args else e))
    try:
        return build_assets(args.config, args.backbone_config, overrides, args.work, args.assets or config.demo.assets,
                            args.data, args.threads)
    except StageFailed as e:
        sys.exit(f"demo-assets failed: {e}")


if __name__ == "__main__":
    main()
