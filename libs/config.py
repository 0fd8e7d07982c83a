"""ml_collections configs: load a `get_config()` file and apply `--config.a.b=value` overrides."""
import ast
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections

from libs.errors import MissingInput

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_config_file(path) -> ml_collections.ConfigDict:
    """Imports `path` (a .py file with get_config()) and returns its locked config."""
    path = Path(path)
    if not path.is_file() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise MissingInput(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()  # unknown keys are errors from here on
    return config


def parse_value(text: str, current):
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got '{text}'")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = text
    return value


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str):
    """Sets config.<dotted> from a string; unknown keys raise KeyError naming the key."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(f"unknown config key 'config.{'.'.join(parents[:i + 1])}'")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(f"unknown config key 'config.{dotted}'")
    current = node[leaf]
    try:
        value = parse_value(text, current)
        with node.unlocked():
            node[leaf] = value
    except (TypeError, ValueError) as e:  # ml_collections refuses a value of another type with TypeError
        raise ValueError(f"config.{dotted}={text}: {e} (the default is {current!r}, "
                         f"a {type(current).__name__})") from e


def split_overrides(argv):
    """Separates `--config.a.b=v` / `--config.a.b v` items from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                key, value = arg[len("--config."):].split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg} needs a value")
                key, value = arg[len("--config."):], argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def parse_args_with_config(parser, default_config: str, argv=None):
    """argparse + `--config <file>` + `--config.x.y=v` overrides -> (args, config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv)
    parser.add_argument("--config", default=default_config,
                        help=f"config file with get_config() (default {default_config}); "
                             "override any value with --config.<key>=<value>")
    args = parser.parse_args(rest)
    config = load_config_file(args.config)
    for key, value in overrides:
        try:
            apply_override(config, key, value)
        except (KeyError, ValueError) as e:
            parser.error(str(e.args[0] if e.args else e))
    return args, config


def config_to_dict(config) -> dict:
    """Plain JSON-able dict of a config (saved in run folders and checkpoints)."""
    return json.loads(config.to_json_best_effort())


def flatten_config(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
