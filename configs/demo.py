"""CPU demo on procedural images (`make demo DATA=synthetic`): KA-MIG on a small frozen AutoNAT over 8x8 tokens.

The measurement (three models from one frozen backbone, held-out NLL with confidence intervals, FID) is the
same as `make demo` on Fashion-MNIST (configs/demo_fashion.py, which starts from this file).
"""
import ml_collections

from configs import ka_mig_l

ASSETS = "demo/assets/synthetic"   # committed demo weights (rebuilt by `make demo-assets DATA=synthetic`)
OUT = "output/demo_synthetic"      # everything `make demo DATA=synthetic` writes


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
    tok.checkpoint = f"{ASSETS}/vqgan_demo.safetensors"

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

    # KA-MIG (and the head-only control) on the frozen demo backbone: graph modules + head only. The paper's
    # KA-MIG recipe relative to its own pretraining: lr a quarter of the backbone's (1e-4 vs 4e-4; here 2.5e-4 vs
    # 1e-3), warm-up 20% of the steps, AdamW betas (0.99, 0.99) without weight decay (from ka_mig_l); an EMA
    # horizon of a quarter of the run (the paper's 0.9999 would barely leave the start in 400 steps).
    t = config.train
    t.mode = "ka_mig"
    t.init_checkpoint = f"{ASSETS}/autonat_demo.safetensors"
    t.n_steps = 400
    t.batch_size = 64
    t.lr = 2.5e-4
    t.warmup_steps = 80
    t.ema_rate = 0.99
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

    # demo/make_data.py, demo/run_demo.py, demo/make_assets.py; classes = model.num_classes, image size =
    # tokenizer.resolution
    config.demo = d = ml_collections.ConfigDict()
    d.source = "synthetic"          # procedural images (demo/procedural_data.py); "fashion_mnist" in demo_fashion.py
    d.data_root = "data/demo"       # ImageFolder trees <data_root>/train and <data_root>/<heldout_split>
    d.train_per_class = 500         # images the tokens, graphs and training use
    d.assets_train_per_class = 500  # images the tokenizer and the backbone of `make demo-assets` use
    d.heldout_split = "val"         # held-out images: NLL tokens and FID reference
    d.heldout_per_class = 200
    d.data_seed = 0                 # train split; the held-out split uses data_seed + 1
    d.fashion_mnist = ""            # (fashion_mnist only) a folder with the idx files; "" = look for them
    d.fashion_mnist_cache = "data/fashion-mnist"  # where the fetched package is unpacked
    # held-out masked-token NLL (libs/evaluation/nll.py): every held-out token row, fixed seeded masks
    d.nll_ratios = (0.1, 0.3, 0.5, 0.7, 0.9)
    d.nll_seed = 0
    d.nll_images = 0                # 0 = every held-out image
    d.ci_level = 0.95
    # FID: samples of every model against the first fid_reference_per_class held-out images of each class
    d.fid_samples = 1000            # generated images per model (balanced over the classes)
    d.fid_reference_per_class = 100
    d.reference_features = ""       # file in `assets` with their Inception features ("" = computed by the demo)
    d.fid_spread_subsets = 50       # half-size subsets for the spread of FID (delete-half jackknife)
    d.fid_spread_seed = 0
    d.sample_seed = 0               # the same for every model
    d.grid_per_class = 8
    d.batch_size = 50               # Inception batch
    d.sample_batch_size = 250       # generate_npz.py batch (larger batches sample faster on a CPU)
    d.nll_batch_size = 250
    d.heldout_curve = False         # `make demo-assets`: held-out NLL of every saved backbone checkpoint
    d.curve_images = 1000           # held-out images of that curve (the first rows of the held-out tokens)
    d.assets = ASSETS
    d.backbone_file = "autonat_demo.safetensors"  # the backbone in `assets` (the other files are named after it)
    d.train_tokenizer = True        # `make demo-assets` trains the tokenizer (False: reuses the one in `assets`)
    d.shuffled_graphs = False       # `make demo` also trains KA on graphs with permuted token ids (a 4th model)
    return config
