"""The interactive page: sample class-conditional grids and edit images (inpaint / outpaint / another class).

    make app                                   # installs requirements-app.txt into .venv/app, then this
    python app.py                              # http://127.0.0.1:7860 (ImageNet weights if in assets/, else demo)
    python app.py --weights demo --port 0      # the committed Fashion-MNIST weights, any free port
    python app.py --config configs/ka_mig_l.py --checkpoint <run>/model_ema.safetensors   # a trained run

Needs gradio (requirements-app.txt; the core install does not). Everything the page makes goes through the
same library calls as generate_img.py (libs/app/logic.py). The page listens on 127.0.0.1 only unless --host
says otherwise. A user error at start-up ends with one line `error: ...`, exit status 2.
"""
import argparse
import socket
import sys

from libs.cli import ArgumentParser, run_main
from libs.config import split_overrides
from libs.errors import BadInput, MissingInput

def build_parser():
    """The page's flags."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=["auto", "demo", "imagenet"], default="auto",
                        help="auto (default): the ImageNet weights when they are in assets/, else the committed "
                             "Fashion-MNIST demo weights; demo; imagenet (an error names the missing files)")
    parser.add_argument("--config", default=None,
                        help="with --checkpoint: the config of a trained run (override keys with --config.x=v)")
    parser.add_argument("--checkpoint", default=None, help="weights of a trained run (as generate_img.py)")
    parser.add_argument("--model", default=None, help="model kind of --checkpoint (default: from the config)")
    parser.add_argument("--strategy", default=None, help="a strategy file to offer first in the page's menu")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cpu-kernels", choices=["onednn", "default"], default=None,
                        help="as generate_img.py (default onednn for fp32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    return parser


def free_port(host: str) -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv=None):
    """Loads the models, builds the page and serves it until interrupted."""
    overrides, rest = split_overrides(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(rest)
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port {args.port}: 0 (any free port) to 65535")
    try:
        import gradio  # noqa: F401, PLC0415 - checked before the models are loaded
    except ImportError as e:
        raise MissingInput("gradio is not installed: `make app` installs requirements-app.txt into .venv/app "
                           "and starts the page") from e
    from libs.app import logic  # noqa: PLC0415 - loads torch; after the flags are checked
    from libs.app.ui import build_page, launch  # noqa: PLC0415
    choice = logic.choose_weights(args.weights, args.config, args.checkpoint, args.model, overrides)
    print(choice.note, flush=True)
    names = None
    if choice.config == logic.DEMO_CONFIG:
        from demo.fashion_mnist import CLASS_NAMES  # noqa: PLC0415 - the demo's class names
        names = list(CLASS_NAMES)
    models = logic.load_models(choice, args.device, args.cpu_kernels, fallback_names=names)
    if args.strategy:
        print(logic.describe_strategy(args.strategy), flush=True)  # a bad file stops here, in one line
    port = args.port or free_port(args.host)
    print(f"serving on http://{args.host}:{port}", flush=True)
    launch(build_page(models, logic.strategy_files([args.strategy])), args.host, port)


if __name__ == "__main__":
    run_main(main)
