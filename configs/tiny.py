"""A tiny KA-MIG (4x4 tokens, 32 codes, 4 classes) for tests: every code path, seconds on a CPU."""
from configs import ka_mig_l


def get_config():
    config = ka_mig_l.get_config()
    config.run_name = "tiny"

    tok = config.tokenizer
    tok.channels = 8
    tok.channel_mult = (1, 2)
    tok.num_res_blocks = 1
    tok.embed_dim = 8
    tok.codebook_size = 32
    tok.resolution = 8
    tok.norm_groups = 4
    tok.checkpoint = ""

    m = config.model
    m.codebook_size = 32
    m.seq_len = 16
    m.num_classes = 4
    m.embed_dim = 32
    m.depth = 2
    m.num_heads = 2
    m.dropout = 0.0

    config.graph.dir = ""

    t = config.train
    t.mode = "pretrain"
    t.init_checkpoint = ""
    t.n_steps = 20
    t.batch_size = 16
    t.lr = 1e-3
    t.warmup_steps = 2
    t.mixed_precision = "no"
    t.log_interval = 5
    t.save_interval = 10

    config.data.path = ""
    return config
