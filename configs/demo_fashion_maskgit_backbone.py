"""Pretraining of the Fashion-MNIST demo's MaskGIT backbone (`make demo-assets BACKBONE=maskgit`):
configs/demo_fashion_maskgit.py in `pretrain` mode with MaskGIT's recipe (configs/maskgit.py: cosine masking with
a minimum masking rate of 0.5, label smoothing 0.1, per-sample loss average, AdamW betas (0.9, 0.96), weight decay
0.045, warm-up), at the AutoNAT demo backbone's batch, learning rate and EMA; shorter (6,000 steps of 64)."""
from configs import demo_fashion_maskgit, maskgit
from configs.demo_backbone import pretrain


def get_config():
    config = pretrain(demo_fashion_maskgit.get_config(), "output/demo_assets_fashion_mnist_maskgit")
    release = maskgit.get_config().train
    t = config.train
    t.betas = release.betas
    t.weight_decay = release.weight_decay
    t.n_steps = 6000
    t.warmup_steps = 200
    t.ema_rate = 0.998
    t.save_interval = 500           # every checkpoint is kept: the held-out curve evaluates each
    t.keep_checkpoints = 1000
    return config
