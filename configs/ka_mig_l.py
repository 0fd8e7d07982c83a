"""KA-MIG on a frozen AutoNAT-L: the paper's run and the default config of every script.

Recipes: docs/reference.md#knowledge-graphs and #training-recipes.
"""
import ml_collections

from configs import autonat_l


def get_config():
    config = autonat_l.get_config()
    config.run_name = "ka_mig_l"

    config.graph = g = ml_collections.ConfigDict()
    g.use_co = True              # token co-occurrence graph G_co (positive)
    g.use_sim = True             # token semantic-similarity graph G_s (positive)
    g.use_incompat = True        # per-class position-token incompatibility G_p (negative)
    g.gcn_layers = 3             # GCN width = model.embed_dim (derived: the GCN input is the word embedding)
    g.gnn = "gcn"                # encoder of G_co / G_s: "gcn" (the released model) or "gat" (graph attention)
    g.dir = "graph_prior"        # the three graph files; names fixed in libs/graphs/files.py (GRAPH_FILES)

    # how graph_construction/build_graphs.py builds them (its flags override these)
    g.recipe = r = ml_collections.ConfigDict()
    r.max_images = 50_000        # G_co / G_s: seeded random subset of token maps (<= 0: all); G_p uses all
    r.seed = 0                   # seed of that subset
    r.neighbourhood = 8          # G_co: 4- or 8-neighbourhood of a token on the grid
    r.co_ratio = 0.05            # G_co: keep max(1, int(nnz_row * ratio)) neighbours (51 of 1023 = released file)
    r.sim_k = 2                  # G_s: neighbours per token
    r.sim_alpha = 5.0            # G_s: edge weight exp(-alpha * JS)
    r.sim_measure = "divergence"  # G_s: Jensen-Shannon 'divergence' (the released file) or 'distance' (its sqrt)
    r.sim_frobenius_norm = False  # G_s: divide the min-max normalised histograms by their norm (off: released file)

    t = config.train
    t.mode = "ka_mig"
    t.init_checkpoint = "assets/nnet_ema.pth"
    t.n_steps = 1500
    t.batch_size = 2400          # 300 per GPU x 8 GPUs
    t.lr = 1e-4
    t.betas = (0.99, 0.99)
    t.weight_decay = 0.0
    t.warmup_steps = 300
    t.save_interval = 500
    t.log_interval = 10
    return config
