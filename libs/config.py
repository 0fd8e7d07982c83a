"""ml_collections configs: load a `get_config()` file and apply `--config.a.b=value` overrides."""
import ast
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections

from libs.errors import BadInput, MissingInput, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
NON_FINITE = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")  # float() spellings


def load_config_file(path) -> ml_collections.ConfigDict:
    """Imports `path` (a .py file with get_config()) and returns its locked config.

    MissingInput when the file is absent; BadInput (one line) when it does not load: a syntax error, no
    get_config(), an exception raised while running it, or a result that is not an ml_collections.ConfigDict."""
    path = Path(path)
    if not path.is_file() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise MissingInput(f"config file not found: {path}")
    module = _import_config_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise BadInput(f"config file {path} has no get_config() function (it must return an ml_collections "
                       f"ConfigDict)")
    try:
        config = module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the config file is the user's code
        raise BadInput(f"config file {path}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise BadInput(f"config file {path}: get_config() returned a {type(config).__name__}, not an "
                       f"ml_collections.ConfigDict")
    config.lock()  # unknown keys are errors from here on
    return config


def _import_config_module(path: Path):
    """The module of a config file; BadInput naming the file (and line) when importing it fails."""
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except SyntaxError as e:
        raise BadInput(f"config file {path} does not load: {type(e).__name__} at line {e.lineno}: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - the config file is the user's code
        raise BadInput(f"config file {path} does not load: {type(e).__name__}: {e}") from e
    return module


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
    if isinstance(current, float) and text.strip().lower() in NON_FINITE:
        value = float(text)  # refused by the value check, with what is allowed, instead of a type error
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
    """Separates `--config.a.b=v` / `--config.a.b v` items from the other arguments.

    BadInput when a `--config.a.b` has no value: it ends the command line, or another flag (`--...`) follows it."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                key, value = arg[len("--config."):].split("=", 1)
            else:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    found = "it ends the command line" if i + 1 >= len(argv) else f"{argv[i + 1]} follows it"
                    raise BadInput(f"{arg} needs a value ({arg}=<value> or {arg} <value>); {found}")
                key, value = arg[len("--config."):], argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> list:
    """Applies (dotted key, text) overrides; returns one message per override that could not be applied
    (unknown key, value of another type), the others applied."""
    errors = []
    for key, value in overrides:
        try:
            apply_override(config, key, value)
        except (KeyError, ValueError) as e:
            errors.append(str(e.args[0] if e.args else e))
    return errors


def resolve_config(path, overrides) -> ml_collections.ConfigDict:
    """The config of file `path` with `overrides` applied, checked (libs.config_schema): MissingInput, or one
    BadInput listing every override that could not be applied and every value that cannot be used."""
    from libs.config_schema import config_violations  # noqa: PLC0415 - it imports the model code
    config = load_config_file(path)
    problems = apply_overrides(config, overrides)
    problems += config_violations(config)
    if problems:
        raise BadInput(f"config {path}: " + "; ".join(problems))
    return config


def parse_args_with_config(parser, default_config: str, argv=None):
    """argparse + `--config <file>` + `--config.x.y=v` overrides -> (args, config), checked before any work.

    A `--config.*` item without a value, an unknown key or a value of another type is a flag error
    (parser.error: one line, exit status 2; every such item and every unusable value named at once). A config
    file that does not load is MissingInput / BadInput; values that cannot be used (libs.config_schema: type,
    range, choice, relations between keys) raise one BadInput naming each key, its value and what is allowed.
    """
    from libs.config_schema import check_config, config_violations  # noqa: PLC0415 - it imports the model code
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        overrides, rest = split_overrides(argv)
    except BadInput as e:
        parser.error(str(e))
    parser.add_argument("--config", default=default_config,
                        help=f"config file with get_config() (default {default_config}); "
                             "override any value with --config.<key>=<value>")
    args = parser.parse_args(rest)
    config = load_config_file(args.config)
    errors = apply_overrides(config, overrides)
    if errors:
        parser.error("; ".join(errors + config_violations(config)))
    check_config(config, what=f"config {args.config}")
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
