"""The one place that builds models from a config: the VQGAN tokenizer, the bare backbones (AutoNAT, MaskGIT) and
their knowledge-augmented versions with the graphs (KA-MIG on AutoNAT, KA-MaskGIT).

`config.backbone` ('autonat' when absent, or 'maskgit') names the backbone; a model kind is the backbone alone or
with the graphs (BACKBONE_KINDS).

Training (`libs.training.trainer`), sampling scripts and periodic evaluation all build through here.
"""
from libs.checkpoint import load_state_dict_file, load_strict
from libs.graphs.files import load_graph_folder
from libs.models.autonat import AutoNAT, AutoNATConfig
from libs.models.cpu_kernels import apply_cpu_kernels
from libs.models.fusion_cache import FusionCache
from libs.models.ka_maskgit import KAMaskGIT
from libs.models.ka_mig import KAMIG, GraphConfig
from libs.models.knowledge import KnowledgeHost
from libs.models.maskgit import MaskGIT, maskgit_config
from libs.models.vqgan import VQGAN, VQGANConfig

MODEL_KINDS = ("ka_mig", "autonat", "ka_maskgit", "maskgit")
GRAPH_KINDS = ("ka_mig", "ka_maskgit")  # the kinds that read config.graph and its graph files
BACKBONE_KINDS = {"autonat": ("autonat", "ka_mig"), "maskgit": ("maskgit", "ka_maskgit")}  # (bare, with graphs)
DEFAULT_CHECKPOINTS = {"ka_mig": "assets/graph_nnet_ema.pth", "autonat": "assets/nnet_ema.pth",
                       "maskgit": "assets/maskgit_imagenet256.safetensors",  # python -m tools.convert_maskgit
                       "ka_maskgit": "assets/ka_maskgit_ema.safetensors"}  # none released: a run's model_ema.safetensors


def tokenizer_config(tok_cfg) -> VQGANConfig:
    """VQGANConfig from a config's `tokenizer` block (extra keys such as `checkpoint` are ignored)."""
    fields = VQGANConfig.__dataclass_fields__
    return VQGANConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                          for k, v in dict(tok_cfg).items() if k in fields})


def load_tokenizer(tok_cfg, checkpoint=None, device="cpu") -> VQGAN:
    """Builds the tokenizer of `tok_cfg` and loads its weights strictly (bare or under 'state_dict')."""
    path = checkpoint or tok_cfg.checkpoint
    if not path:
        raise ValueError("no tokenizer checkpoint given (config.tokenizer.checkpoint is empty)")
    model = VQGAN(tokenizer_config(tok_cfg))
    load_strict(model, load_state_dict_file(path), source=str(path))
    return model.eval().requires_grad_(False).to(device)


def check_tokenizer_matches(tokenizer_codebook_size: int, grid_size: int, cfg: AutoNATConfig):
    """Refuses a tokenizer whose codebook or grid differs from the backbone's, before any work."""
    if tokenizer_codebook_size != cfg.codebook_size or grid_size * grid_size != cfg.seq_len:
        raise ValueError(f"tokenizer (codebook {tokenizer_codebook_size}, grid {grid_size}x{grid_size}) does not "
                         f"match the backbone (codebook {cfg.codebook_size}, {cfg.seq_len} tokens)")


def backbone_config(model_cfg) -> AutoNATConfig:
    """AutoNATConfig from a config's `model` block."""
    return AutoNATConfig(**dict(model_cfg))


def graph_config(graph_cfg) -> GraphConfig:
    """GraphConfig (switches, encoder depth and kind) from a config's `graph` block; a block without `gnn`
    (configs written before the GAT encoder) means "gcn". ValueError for an unknown encoder."""
    return GraphConfig(use_co=graph_cfg.use_co, use_sim=graph_cfg.use_sim, use_incompat=graph_cfg.use_incompat,
                       gcn_layers=graph_cfg.gcn_layers, gnn=graph_cfg.get("gnn", "gcn"))


def load_graphs(config) -> dict:
    """The graphs `config.graph` switches on, read from `config.graph.dir` and checked against `config.model`
    (libs.graphs.files.load_graph_folder: one token dataset, the model's codebook, grid and classes), as tensors."""
    g, m = config.graph, config.model
    names = [n for n, on in (("co", g.use_co), ("sim", g.use_sim), ("incompat", g.use_incompat)) if on]
    return load_graph_folder(g.dir, names, m.codebook_size, m.seq_len, m.num_classes)


def backbone_of(config) -> str:
    """config.backbone: 'autonat' (also when the key is absent, as in configs written before MaskGIT) or 'maskgit'."""
    name = config.get("backbone", "autonat")
    if name not in BACKBONE_KINDS:
        raise ValueError(f"unknown config.backbone='{name}' ({' or '.join(BACKBONE_KINDS)})")
    return name


def model_kind(config, graphs: bool) -> str:
    """The kind of config's backbone: bare ('autonat', 'maskgit') or with the graphs ('ka_mig', 'ka_maskgit')."""
    return BACKBONE_KINDS[backbone_of(config)][int(graphs)]


def default_kind(config) -> str:
    """The model a config describes: its backbone, with the graphs when it has a graph block."""
    return model_kind(config, graphs="graph" in config)


def check_model_kind(config, kind: str):
    """Raises ValueError for an unknown kind, or one of another backbone than config.backbone's."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind '{kind}' ({', '.join(MODEL_KINDS)})")
    backbone = backbone_of(config)
    if kind not in BACKBONE_KINDS[backbone]:
        raise ValueError(f"model '{kind}' is not built on config.backbone='{backbone}' (use "
                         f"{' or '.join(BACKBONE_KINDS[backbone])}, or a config of the other backbone: "
                         f"configs/ka_mig_l.py for autonat, configs/ka_maskgit.py for maskgit)")


def build_model(config, kind: str, graphs: dict = None):
    """A freshly initialised AutoNAT ('autonat'), KAMIG ('ka_mig'), MaskGIT ('maskgit') or KAMaskGIT ('ka_maskgit');
    the graphs are loaded from config.graph.dir when not given. ValueError for a kind config.backbone does not
    build (check_model_kind)."""
    check_model_kind(config, kind)
    if kind == "autonat":
        return AutoNAT(backbone_config(config.model))
    if kind == "maskgit":
        return MaskGIT(maskgit_config(config.model))
    graphs = load_graphs(config) if graphs is None else graphs
    if kind == "ka_mig":
        return KAMIG(backbone_config(config.model), graph_config(config.graph), graphs)
    return KAMaskGIT(maskgit_config(config.model), graph_config(config.graph), graphs)


def load_model(config, kind: str = "ka_mig", checkpoint=None, device="cpu", graphs: dict = None,
               cpu_kernels: str = "default"):
    """A model of `kind` with `checkpoint` (default DEFAULT_CHECKPOINTS[kind]) loaded strictly, frozen, eval mode.

    `cpu_kernels`: 'onednn' runs fp32 CPU inference linears through oneDNN (libs.models.cpu_kernels); the
    library default is the plain model, the sampling scripts' flag defaults to 'onednn'.
    Raises MissingAssetError (checkpoint absent), ValueError (another architecture; names the tensors).
    """
    checkpoint = checkpoint or DEFAULT_CHECKPOINTS[kind]
    model = build_model(config, kind, graphs)
    load_strict(model, load_state_dict_file(checkpoint), source=str(checkpoint),
                kinds=BACKBONE_KINDS[backbone_of(config)])  # a mismatch hint names this backbone's --model values
    return apply_cpu_kernels(model, cpu_kernels).eval().requires_grad_(False).to(device)


def for_sampling(model):
    """What the sampler calls: a FusionCache over a model with graphs (weight-only terms once), else the model."""
    return FusionCache(model) if isinstance(model, KnowledgeHost) else model


def load_tokenizer_and_model(config, kind, checkpoint=None, device="cpu", graphs=None, cpu_kernels="default"):
    """(tokenizer, sampler) with the codebook/grid check done before any weights are read."""
    tok = tokenizer_config(config.tokenizer)
    check_tokenizer_matches(tok.codebook_size, tok.grid_size, backbone_config(config.model))
    tokenizer = load_tokenizer(config.tokenizer, device=device)
    model = load_model(config, kind, checkpoint, device, graphs, cpu_kernels)
    return tokenizer, for_sampling(model)
