"""What every config key may hold: its type, range or choices, and its relations to other keys, declared once.

`RULES` maps each dotted key of the configs in configs/ to a `Rule`; `RELATIONS` lists the constraints between keys.
`config_violations(config)` returns one line per violation (key, value, what is allowed); `check_config(config)`
raises BadInput listing all of them on one line. Entry scripts check the resolved config (file + overrides + flags)
through `libs.config.parse_args_with_config` before any work; docs/configs.md has the table.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

from libs.errors import BadInput
from libs.graphs.recipes import HALF_OFFSETS, SIM_MEASURES
from libs.models.autonat import AutoNATConfig
from libs.models.factory import BACKBONE_KINDS
from libs.models.ka_mig import GNN_KINDS
from libs.sampling.decoding import GUIDANCE_SCHEDULES, ORDERS, parse_guidance_steps
from libs.sampling.generation import PIXELS, max_sample_seed
from libs.training.objective import LOSS_AVERAGES, MASK_SCHEDULES
from libs.training.tracking import LOG_WITH

TRAIN_MODES = ("pretrain", "ka_mig")  # libs.training.trainer.MODE_MODEL (not imported: accelerate is slow to load)
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # what accelerate runs on CPUs and GPUs alike
DEMO_SOURCES = ("synthetic", "fashion_mnist")  # demo/make_data.py
OPTIONAL_BLOCKS = ("graph", "tokenizer_train", "demo")  # blocks only some configs have (their keys are checked
#                                                         when the block is there)
STRICT_BLOCKS = {"model": tuple(AutoNATConfig.__dataclass_fields__)}  # blocks whose every key is a model size
SEED_LIMIT = 2 ** 63  # seeds lie in [0, SEED_LIMIT): seed + epoch (training batches) stays below 2**64
MISSING = object()  # a key the config does not have


@dataclass(frozen=True)
class Rule:
    """The values one key may hold: `ok(value)` is True for them, `allowed` says which in words.

    `item`: for a list, the rule of each entry (checked after `ok`, entries named key[i]); `required`: whether a
    config whose block exists must have the key (False for keys older configs lack and the code defaults)."""
    allowed: str
    ok: Callable[[object], bool]
    item: Optional["Rule"] = None
    required: bool = True


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return f" {'<' if hi_open else '<='} {hi:g}" if hi is not None else ""


def _within(v, lo, hi, lo_open, hi_open) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def integer(lo=None, hi=None, *, hi_open=False, also="", required=True) -> Rule:
    """An int (not a bool) in [lo, hi] (either bound optional); `also` adds words to the description."""
    return Rule(f"an integer{_bounds(lo, hi, False, hi_open)}{also}",
                lambda v: _is_int(v) and _within(v, lo, hi, False, hi_open), required=required)


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, required=True) -> Rule:
    """A finite real number (an int is fine) in the range; NaN and infinities never are."""
    return Rule(f"a finite number{_bounds(lo, hi, lo_open, hi_open)}",
                lambda v: _is_real(v) and _within(v, lo, hi, lo_open, hi_open), required=required)


def probability() -> Rule:
    """A probability or fraction: a finite number in [0, 1]."""
    return number(0, 1)


def seed() -> Rule:
    """A seed every random generator of the code takes, with room for the offsets added to it."""
    return Rule("an integer in [0, 2**63) (a seed plus the offsets the code adds must stay below 2**64, what "
                "torch.Generator.manual_seed takes)", lambda v: _is_int(v) and 0 <= v < SEED_LIMIT)


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text(nonempty=False) -> Rule:
    """A string (a path, a name); `nonempty` refuses ''."""
    return Rule("a non-empty string" if nonempty else "a string", lambda v: isinstance(v, str) and (v or not nonempty))


def folder_name() -> Rule:
    """A plain folder name: non-empty, no '/' or '\\', not '.' or '..' (stays inside its parent folder)."""
    return Rule("a plain folder name (non-empty, no '/' or '\\', not '.' or '..')",
                lambda v: isinstance(v, str) and v not in ("", ".", "..") and not any(c in v for c in "/\\"))


def choice(*options, required=True) -> Rule:
    return Rule(f"one of {', '.join(repr(o) for o in options)}", lambda v: isinstance(v, str) and v in options,
                required=required)


def listing(item: Rule, length=None, min_length=0) -> Rule:
    """A list or tuple (of `length` entries, or at least `min_length`) whose entries obey `item`."""
    size = f"{length} " if length is not None else f"{min_length} or more " if min_length else ""
    return Rule(f"a list of {size}entries, each {item.allowed}",
                lambda v: isinstance(v, (list, tuple)) and (len(v) == length if length is not None
                                                             else len(v) >= min_length), item=item)


def guidance_steps_text() -> Rule:
    """'all', step indices and ranges as text ('4-7', '0,2,5'), or a list of indices; whether they parse and lie
    within the schedule's steps is the relation of sample.guidance_steps (RELATIONS)."""
    return Rule("'all', or step indices and ranges a-b with a <= b such as '4-7' or '0,2,5'",
                lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(_is_int(s) for s in v)),
                required=False)


# One rule per key of the configs in configs/ (tests/test_config_validation.py checks that none is left out).
RULES = {
    "seed": seed(),
    "run_name": folder_name(),  # <output_dir>/<run_name>: must stay inside output_dir
    "output_dir": text(),
    "backbone": choice(*BACKBONE_KINDS, required=False),  # libs.models.factory: absent means 'autonat'
    # the VQGAN tokenizer (libs.models.vqgan.VQGANConfig)
    "tokenizer.channels": integer(1),
    "tokenizer.channel_mult": listing(integer(1), min_length=1),
    "tokenizer.num_res_blocks": integer(1),
    "tokenizer.embed_dim": integer(1),
    "tokenizer.codebook_size": integer(1),
    "tokenizer.resolution": integer(1),
    "tokenizer.norm_groups": integer(1),
    "tokenizer.dropout": number(0, 1, required=False),
    "tokenizer.checkpoint": text(),
    # the backbone (libs.models.autonat.AutoNATConfig; libs.models.maskgit.MaskGITConfig has the same keys)
    "model.codebook_size": integer(1),
    "model.seq_len": integer(1),
    "model.num_classes": integer(1),
    "model.embed_dim": integer(1),
    "model.depth": integer(0),  # even for AutoNAT: RELATIONS
    "model.num_heads": integer(1),
    "model.mlp_ratio": number(0, lo_open=True),
    "model.qkv_bias": boolean(),
    "model.dropout": probability(),
    "model.use_checkpoint": boolean(),
    "data.path": text(),
    # training (libs/training/trainer.py, objective.py)
    "train.mode": choice(*TRAIN_MODES),
    "train.init_checkpoint": text(),
    "train.n_steps": integer(1),
    "train.batch_size": integer(1),
    "train.grad_accum": integer(1),
    "train.lr": number(0, lo_open=True),
    "train.betas": listing(number(0, 1, hi_open=True), length=2),
    "train.weight_decay": number(0),
    "train.warmup_steps": integer(0),
    "train.grad_clip": number(0),
    "train.compile": boolean(),
    "train.ema_rate": probability(),
    "train.mixed_precision": choice(*MIXED_PRECISIONS),
    "train.max_skipped_steps": integer(0),
    "train.p_uncond": probability(),
    "train.mask_beta": listing(integer(1), length=2),
    # absent: AutoNAT's objective (Beta law, no minimum rate, mean over the batch's masked places)
    "train.mask_schedule": choice(*MASK_SCHEDULES, required=False),
    "train.min_mask_rate": number(0, 1, required=False),
    "train.loss_average": choice(*LOSS_AVERAGES, required=False),
    "train.label_smoothing": probability(),
    "train.log_interval": integer(1),
    "train.log_with": choice(*LOG_WITH, required=False),
    "train.save_interval": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.fid_interval": integer(0),
    "train.fid_samples": integer(2),
    "train.fid_ref_stats": text(),
    # decoding (libs/sampling/decoding.py); also what a --strategy file may set
    "sample.schedule": choice("autonat", "maskgit"),
    "sample.ratios": listing(probability()),
    "sample.conf_temps": listing(number(0)),
    "sample.sample_temps": listing(number(0), min_length=1),
    "sample.guidance": listing(number(0)),
    "sample.pixels": choice(*PIXELS, required=False),
    "sample.steps": integer(1),
    "sample.cfg_scale": number(0),
    "sample.temp": number(0),
    "sample.guidance_schedule": choice(*GUIDANCE_SCHEDULES, required=False),
    "sample.guidance_power": number(0, lo_open=True, required=False),
    "sample.guidance_steps": guidance_steps_text(),
    "sample.order": choice(*ORDERS, required=False),
    # KA-MIG's graphs (libs/models/ka_mig.py) and their recipe (libs/graphs/recipes.py)
    "graph.use_co": boolean(),
    "graph.use_sim": boolean(),
    "graph.use_incompat": boolean(),
    "graph.gcn_layers": integer(1),
    "graph.gnn": choice(*GNN_KINDS, required=False),
    "graph.dir": text(),
    "graph.recipe.max_images": integer(also=" (<= 0: every token map)"),
    "graph.recipe.seed": seed(),
    "graph.recipe.neighbourhood": Rule(f"one of {', '.join(map(str, sorted(HALF_OFFSETS)))}",
                                       lambda v: _is_int(v) and v in HALF_OFFSETS),
    "graph.recipe.co_ratio": number(0, 1, lo_open=True),
    "graph.recipe.sim_k": integer(1),
    "graph.recipe.sim_alpha": number(0),
    "graph.recipe.sim_measure": choice(*SIM_MEASURES),
    "graph.recipe.sim_frobenius_norm": boolean(),
    # the demo's tokenizer training (demo/tokenizer_training.py)
    "tokenizer_train.steps": integer(1),
    "tokenizer_train.batch_size": integer(1),
    "tokenizer_train.lr": number(0, lo_open=True),
    "tokenizer_train.warmup_steps": integer(0),
    "tokenizer_train.weight_decay": number(0),
    "tokenizer_train.beta": number(0),
    "tokenizer_train.kmeans_images": integer(1),
    "tokenizer_train.kmeans_iters": integer(0),
    "tokenizer_train.restart_interval": integer(0, also=" (0: never)"),
    "tokenizer_train.flip": boolean(),
    "tokenizer_train.seed": seed(),
    "tokenizer_train.log_interval": integer(1),
    # the demo drivers (demo/)
    "demo.source": choice(*DEMO_SOURCES),
    "demo.data_root": text(nonempty=True),
    "demo.train_per_class": integer(0, also=" (0: the whole training split)"),
    "demo.assets_train_per_class": integer(0, also=" (0: the whole training split)"),
    "demo.heldout_split": Rule("a split name other than 'train'", lambda v: isinstance(v, str) and v not in ("", "train")),
    "demo.heldout_per_class": integer(1),
    "demo.data_seed": seed(),
    "demo.fashion_mnist": text(),
    "demo.fashion_mnist_cache": text(nonempty=True),
    "demo.nll_ratios": listing(number(0, 1, lo_open=True), min_length=1),
    "demo.nll_seed": seed(),
    "demo.nll_images": integer(0, also=" (0: every held-out image)"),
    "demo.ci_level": number(0, 1, lo_open=True, hi_open=True),
    "demo.fid_samples": integer(2),
    "demo.fid_reference_per_class": integer(1),
    "demo.reference_features": text(),
    "demo.fid_spread_subsets": integer(2),
    "demo.fid_spread_seed": seed(),
    "demo.sample_seed": seed(),
    "demo.grid_per_class": integer(1),
    "demo.batch_size": integer(1),
    "demo.sample_batch_size": integer(1),
    "demo.nll_batch_size": integer(1),
    "demo.heldout_curve": boolean(),
    "demo.curve_images": integer(1),
    "demo.assets": text(),
    "demo.backbone_file": Rule("a file name ending in .pth or .safetensors (no folder)",
                               lambda v: isinstance(v, str) and "/" not in v and v.endswith((".pth", ".safetensors"))),
    "demo.train_tokenizer": boolean(),
    "demo.shuffled_graphs": boolean(),
}


@dataclass(frozen=True)
class Relation:
    """A constraint of `key` that depends on `others`: ok(value, *other values) is True when it holds.

    Checked only when `key` and `others` are present and obey their own rules (others in `missing_ok` are passed
    as MISSING when absent). `allowed` is words, or a function of the same values giving them."""
    key: str
    others: tuple
    ok: Callable[..., bool]
    allowed: Union[str, Callable[..., str]]
    missing_ok: tuple = ()


def _steps(schedule, sample_temps, steps) -> int:
    """T of the configured schedule: the autonat lists' length, or the maskgit step count."""
    return len(sample_temps) if schedule == "autonat" else steps


def _guidance_steps_ok(value, schedule, sample_temps, steps) -> bool:
    try:
        parse_guidance_steps(value, _steps(schedule, sample_temps, steps))
    except ValueError:
        return False
    return True


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


RELATIONS = (
    Relation("model.depth", ("backbone",), lambda d, b: b == "maskgit" or d % 2 == 0,
             lambda d, b: "an even integer >= 0 (depth/2 in-blocks, a mid-block, depth/2 out-blocks) unless "
                          "config.backbone is 'maskgit' (any number of layers)", missing_ok=("backbone",)),
    Relation("model.num_heads", ("model.embed_dim",), lambda h, d: d % h == 0, "a divisor of config.model.embed_dim"),
    Relation("train.batch_size", ("train.grad_accum",), lambda b, a: b % a == 0,
             "a multiple of config.train.grad_accum (the global batch is split into that many micro-batches)"),
    Relation("train.init_checkpoint", ("train.mode",), lambda init, mode: mode != "ka_mig" or bool(init),
             "the frozen backbone's weights (e.g. assets/nnet_ema.pth) when config.train.mode is 'ka_mig'"),
    Relation("train.mode", ("graph",), lambda mode, graph: mode != "ka_mig" or graph is not MISSING,
             lambda mode, graph: "'ka_mig' only in a config with a graph block (configs/ka_mig_l.py has one)",
             missing_ok=("graph",)),
    Relation("tokenizer.resolution", ("tokenizer.channel_mult",),
             lambda r, mult: r % 2 ** (len(mult) - 1) == 0 and r >= 2 ** (len(mult) - 1),
             lambda r, mult: f"a multiple of 2**(len(config.tokenizer.channel_mult) - 1) = {2 ** (len(mult) - 1)} "
                             f"(one halving per level after the first)"),
    Relation("tokenizer.norm_groups", ("tokenizer.channels", "tokenizer.channel_mult"),
             lambda g, c, mult: all(c * m % g == 0 for m in (1, *mult)),
             lambda g, c, mult: f"a divisor of every width config.tokenizer.channels x channel_mult = "
                                f"{sorted({c, *(c * m for m in mult)})} (GroupNorm)"),
    Relation("sample.ratios", ("sample.schedule", "sample.sample_temps"),
             lambda r, s, temps: s != "autonat" or len(r) == len(temps) - 1,
             lambda r, s, temps: f"{len(temps) - 1} entries (T - 1, with T = {len(temps)} sample_temps) for the "
                                 f"autonat schedule"),
    Relation("sample.conf_temps", ("sample.schedule", "sample.sample_temps"),
             lambda c, s, temps: s != "autonat" or len(c) == len(temps) - 1,
             lambda c, s, temps: f"{len(temps) - 1} entries (T - 1, with T = {len(temps)} sample_temps) for the "
                                 f"autonat schedule"),
    Relation("sample.guidance", ("sample.schedule", "sample.sample_temps"),
             lambda g, s, temps: s != "autonat" or len(g) == len(temps),
             lambda g, s, temps: f"{len(temps)} entries (T, one per entry of sample_temps) for the autonat schedule"),
    Relation("sample.guidance_steps", ("sample.schedule", "sample.sample_temps", "sample.steps"), _guidance_steps_ok,
             lambda v, s, temps, steps: (f"'all', or step indices and ranges a-b with a <= b such as '4-7' within "
                                         f"the {_steps(s, temps, steps)} steps 0..{_steps(s, temps, steps) - 1} of "
                                         f"the {s} schedule")),
    Relation("sample.order", ("model.seq_len",), lambda order, n: order != "halton" or _is_square(n),
             "'confidence' unless config.model.seq_len is a square number (the halton order walks a square grid)"),
    Relation("graph.recipe.sim_k", ("model.codebook_size",), lambda k, n: k <= n - 1,
             "at most config.model.codebook_size - 1 (neighbours among the other tokens)"),
    Relation("demo.sample_seed", ("demo.fid_samples",), lambda s, n: s <= max_sample_seed(n),
             lambda s, n: f"at most {max_sample_seed(n)} (sample i is seeded with seed * 1000003 + i, below 2**64)"),
)


def fmt(value) -> str:
    """A value as it appears in a violation: repr (lists as tuples), cut to 80 characters."""
    text_ = "absent" if value is MISSING else repr(tuple(value) if isinstance(value, list) else value)
    return text_ if len(text_) <= 80 else text_[:77] + "..."


def lookup(config, key: str):
    """config[a][b]... for key 'a.b...', or MISSING."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return MISSING
        node = node[part]
    return node


def violation(key: str, value, allowed: str, sources: dict, index: str = "") -> str:
    """'config.<key><index>=<value> (allowed: ...)', naming where the value came from when it was not the config
    file (a flag, an environment variable, a strategy file)."""
    source = f"from {sources[key]}; " if key in sources else ""
    shown = "is missing" if value is MISSING else f"={fmt(value)}"
    return f"config.{key}{index}{'' if value is not MISSING else ' '}{shown} ({source}allowed: {allowed})"


def value_violations(key: str, value, rule: Rule, sources: dict = None, index: str = "") -> list:
    """Violations of one rule by one value (a list's entries are checked one by one, named key[i])."""
    sources = sources or {}
    if not rule.ok(value):
        return [violation(key, value, rule.allowed, sources, index)]
    if rule.item is not None:
        return [v for i, x in enumerate(value) for v in value_violations(key, x, rule.item, sources, f"{index}[{i}]")]
    return []


def _in_scope(key: str, only) -> bool:
    return only is None or key == only or key.startswith(only + ".")


def _rule_violations(config, only, require, sources) -> tuple:
    """(violations, keys that are absent or break their own rule) of the per-key rules."""
    found, bad, missing_blocks = [], set(), set()
    if require and only is None and lookup(config, "schedule") is not MISSING and lookup(config, "sample") is MISSING:
        found.append("this is a decoding strategy (schedule, ratios, ... at the top level), not a full config: give "
                     "it to the sampling scripts with --strategy")
    for key, rule in RULES.items():
        if not _in_scope(key, only):
            continue
        value = lookup(config, key)
        if value is MISSING:
            bad.add(key)
            block = key.split(".")[0]
            if not require or not rule.required or (block in OPTIONAL_BLOCKS and lookup(config, block) is MISSING):
                continue
            if "." in key and lookup(config, block) is MISSING:  # a whole block: named once
                if block not in missing_blocks:
                    missing_blocks.add(block)
                    found.append(f"config.{block} is missing (a block of keys such as {key}; configs/ka_mig_l.py "
                                 f"has every block)")
                continue
            found.append(violation(key, MISSING, rule.allowed, sources))
            continue
        errors = value_violations(key, value, rule, sources)
        found += errors
        if errors:
            bad.add(key)
    for block, fields in STRICT_BLOCKS.items():
        node = lookup(config, block)
        if _in_scope(block, only) and hasattr(node, "keys"):
            found += [f"config.{block}.{k} is not a key of the {block} block (allowed: {', '.join(fields)})"
                      for k in node.keys() if k not in fields]
    return found, bad


def _relation_violations(config, only, bad, sources) -> list:
    """Violations of RELATIONS whose keys are present (or may be absent) and obey their own rules."""
    found = []
    for rel in RELATIONS:
        keys = (rel.key, *rel.others)
        if not _in_scope(rel.key, only) or any(k in bad and k not in rel.missing_ok for k in keys):
            continue
        values = [lookup(config, k) for k in keys]
        if any(v is MISSING and k not in rel.missing_ok for k, v in zip(keys, values)) or rel.ok(*values):
            continue
        if callable(rel.allowed):
            allowed = rel.allowed(*values)
        else:
            allowed = rel.allowed + ", with " + ", ".join(f"config.{k}={fmt(v)}" for k, v in zip(rel.others, values[1:]))
        found.append(violation(rel.key, values[0], allowed, sources))
    return found


def config_violations(config, only: str = None, require: bool = True, sources: dict = None) -> list:
    """One line per violated rule or relation of `config` (a ConfigDict or nested dict), rules first.

    `only`: a block ('sample') to check alone; `require`: report absent keys (False for a partial config such as a
    strategy file); `sources`: key -> where its value came from (a flag), named in the messages."""
    sources = sources or {}
    found, bad = _rule_violations(config, only, require, sources)
    return found + _relation_violations(config, only, bad, sources)


def check_config(config, what: str = "the config", **kwargs):
    """Raises BadInput naming every violation of `config` on one line (see config_violations for the keyword
    arguments); `what` names the config (its file) in the message."""
    found = config_violations(config, **kwargs)
    if found:
        raise BadInput(f"{what}: " + "; ".join(found))
