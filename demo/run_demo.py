"""`make demo`: the whole KA-MIG pipeline end to end on CPU, on procedural images and the committed demo weights.

    python -m demo.run_demo                       # configs/demo.py -> output/demo/
    python -m demo.run_demo --smoke               # configs/demo_smoke.py: a tiny run for the tests
    python -m demo.run_demo --config.demo.fid_samples=500 --threads 2
Runs demo.make_data, extract_imagenet_feature.py, graph_construction.build_graphs, train_graph.py,
generate_img.py, python -m libs.evaluation.fid_stats and generate_npz.py (KA-MIG and the bare backbone) as
subprocesses; writes grids, metrics.json, summary.txt and logs/ to the output folder.
"""
import argparse
import sys

from demo.pipeline import StageFailed, load_demo_config, parse_demo_args, run_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="demo config (default configs/demo.py, or configs/demo_smoke.py with --smoke); "
                             "override any value with --config.<key>=<value>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (configs/demo_smoke.py), for the tests")
    parser.add_argument("--out", default=None, help="output folder (default config.output_dir)")
    parser.add_argument("--data", default=None, help="data root for the ImageFolder trees (default config.demo.data_root)")
    parser.add_argument("--assets", default=None, help="folder of the demo weights (default config.demo.assets)")
    args, overrides = parse_demo_args(parser, argv)

    config_file = args.config or ("configs/demo_smoke.py" if args.smoke else "configs/demo.py")
    try:
        config = load_demo_config(config_file, overrides)  # unknown keys fail here, before any work
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if e.args else e))
    try:
        return run_demo(config_file, overrides, args.out or config.output_dir, args.data, args.assets, args.threads)
    except (StageFailed, FileNotFoundError) as e:
        sys.exit(f"demo failed: {e}")


if __name__ == "__main__":
    main()
