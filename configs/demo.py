"""CPU demo (`make demo`): KA-MIG on a small frozen AutoNAT over 8x8 tokens of procedural 32x32 images."""
import ml_collections

from configs import ka_mig_l

ASSETS = "demo/assets"   # committed demo weights (rebuilt by `make demo-assets`)
OUT = "output/demo"      # everything `make demo` writes


def get_config():
    config = ka_mig_l.get_config()
    config.seed = 0
    config.run_name = "ka_mig"
    config.output_dir = OUT

    tok = config.tokenizer  # the tokenizer architecture at small widths: f4, 32x32 -> 8x8 tokens
    tok.channels = 16
    tok.channel_mult = (1, 2, 2)
    tok.num_res_blocks = 1
    tok.embed_dim = 16
    tok.codebook_size = 256
    tok.resolution = 32
    tok.norm_groups = 8
    tok.checkpoint = f"{ASSETS}/vqgan_demo.pth"

    m = config.model  # the AutoNAT U-ViT at small width: 2 in-blocks, a mid-block, 2 out-blocks
    m.codebook_size = 256
    m.seq_len = 64
    m.num_classes = 10
    m.embed_dim = 128
    m.depth = 4
    m.num_heads = 4
    m.mlp_ratio = 4.0
    m.dropout = 0.1

    config.graph.dir = f"{OUT}/graphs"
    config.graph.recipe.max_images = 0  # G_co / G_s from every demo token map

    config.data.path = f"{OUT}/tokens/train"

    t = config.train  # KA-MIG on the frozen demo backbone: graph modules + head only
    t.mode = "ka_mig"
    t.init_checkpoint = f"{ASSETS}/autonat_demo.pth"
    t.n_steps = 150
    t.batch_size = 64
    t.lr = 5e-4
    t.warmup_steps = 10
    t.ema_rate = 0.98
    t.mixed_precision = "no"
    t.log_interval = 10
    t.save_interval = 10_000      # one checkpoint, at the end
    t.keep_checkpoints = 1
    t.fid_interval = 0

    s = config.sample  # MaskGIT cosine schedule (the AutoNAT-L search was made for 16x16 ImageNet tokens)
    s.schedule = "maskgit"
    s.steps = 8
    s.cfg_scale = 2.0
    s.temp = 4.5
    s.pixels = "round"  # as the demo's earlier runs, so `make demo` numbers stay comparable

    config.tokenizer_train = tt = ml_collections.ConfigDict()  # demo/train_tokenizer.py (demo.tokenizer_training)
    tt.steps = 1500
    tt.batch_size = 32
    tt.lr = 2e-3
    tt.warmup_steps = 50
    tt.weight_decay = 0.0
    tt.beta = 0.25
    tt.kmeans_images = 256
    tt.kmeans_iters = 10
    tt.restart_interval = 50
    tt.flip = True
    tt.seed = 0
    tt.log_interval = 50

    # demo/make_data.py and demo/run_demo.py; classes = model.num_classes, image size = tokenizer.resolution
    config.demo = d = ml_collections.ConfigDict()
    d.data_root = "data/demo"       # ImageFolder trees <data_root>/train and <data_root>/val
    d.train_per_class = 500         # images the tokens, graphs and training use
    d.val_per_class = 30            # held-out images of the FID reference statistics
    d.data_seed = 0                 # train split; the val split uses data_seed + 1
    d.fid_samples = 300             # generated images per model for FID (balanced over the classes)
    d.sample_seed = 0               # the same for KA-MIG and the backbone
    d.grid_per_class = 8
    d.batch_size = 50               # sampling / Inception batch
    d.assets = ASSETS
    return config
