"""AutoNAT-L backbone and its pretraining recipe (docs/reference.md#training-recipes); `mode=pretrain`."""
import ml_collections

from configs import autonat_t8_strategy


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.run_name = "autonat_l"
    config.output_dir = "output"

    config.tokenizer = tok = ml_collections.ConfigDict()
    tok.channels = 128
    tok.channel_mult = (1, 1, 2, 2, 4)
    tok.num_res_blocks = 2
    tok.embed_dim = 256
    tok.codebook_size = 1024
    tok.resolution = 256
    tok.norm_groups = 32
    tok.checkpoint = "assets/vqgan_jax_strongaug.ckpt"

    config.model = m = ml_collections.ConfigDict()
    m.codebook_size = 1024
    m.seq_len = 256
    m.num_classes = 1000
    m.embed_dim = 768
    m.depth = 24
    m.num_heads = 8
    m.mlp_ratio = 4.0
    m.qkv_bias = False
    m.dropout = 0.1
    m.use_checkpoint = False

    config.data = d = ml_collections.ConfigDict()
    d.path = "assets/imagenet256_vq_features/train"  # token dataset (extract_imagenet_feature.py)

    config.train = t = ml_collections.ConfigDict()
    t.mode = "pretrain"            # 'pretrain' (whole backbone) or 'ka_mig' (graph modules + head)
    t.init_checkpoint = ""          # ka_mig: frozen backbone weights (nnet_ema.pth)
    t.n_steps = 500_000
    t.batch_size = 2048             # global: split over processes and accumulation steps
    t.grad_accum = 1
    t.lr = 4e-4
    t.betas = (0.99, 0.99)
    t.weight_decay = 0.03
    t.warmup_steps = 5000
    t.grad_clip = 0.0               # max grad norm; 0 disables clipping
    t.compile = False               # torch.compile the backbone's blocks (names and checkpoints unchanged)
    t.ema_rate = 0.9999
    t.mixed_precision = "fp16"      # 'no', 'fp16' or 'bf16' (ACCELERATE_MIXED_PRECISION overrides)
    t.max_skipped_steps = 25        # fp16 only: steps in a row the loss scaler may skip on gradient overflow
                                    # (each halves the scale; a few in a row is normal, more means the run
                                    # diverges) before training stops; skips are counted in log.csv. Without
                                    # the fp16 scaler, the first non-finite loss or gradient norm stops the run.
    t.p_uncond = 0.15
    t.mask_beta = (12, 3)
    t.label_smoothing = 0.1
    t.log_interval = 50
    t.log_with = "tensorboard"      # curves in <run folder>/tb/ (tensorboard --logdir output); wandb | none
    t.save_interval = 5000
    t.keep_checkpoints = 2
    t.fid_interval = 0              # steps between FID evaluations; 0 = never during training
    t.fid_samples = 5000
    t.fid_ref_stats = "assets/fid_stats_imagenet256_guided_diffusion.npz"

    config.sample = autonat_t8_strategy.get_config()
    return config
