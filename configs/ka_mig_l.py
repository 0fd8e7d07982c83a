"""KA-MIG on a frozen AutoNAT-L (SPEC §3, §5-6); the default config of train_graph.py."""
import ml_collections

from configs import autonat_l


def get_config():
    config = autonat_l.get_config()
    config.run_name = "ka_mig_l"

    config.graph = g = ml_collections.ConfigDict()
    g.use_co = True              # token co-occurrence graph G_co (positive)
    g.use_sim = True             # token semantic-similarity graph G_s (positive)
    g.use_incompat = True        # per-class position-token incompatibility G_p (negative)
    g.gcn_layers = 3
    g.gcn_hidden = 768           # must equal model.embed_dim (the GCN input is the word embedding)
    g.co_occurrence = "graph_prior/codebook_co_occurrence_norm_self_50.pkl"
    g.similarity = "graph_prior/codebook_replace_graph_norm_self.pkl"
    g.incompatibility = "graph_prior/incompatibility.npz"

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
