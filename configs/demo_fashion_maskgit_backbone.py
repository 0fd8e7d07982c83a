"""Pretraining of the Fashion-MNIST demo's MaskGIT backbone (`make demo-assets BACKBONE=maskgit`):
configs/demo_fashion_maskgit.py in `pretrain` mode with MaskGIT's recipe (configs/maskgit.py: cosine masking with
a minimum masking rate of 0.5, label smoothing 0.1, per-sample loss average, AdamW betas (0.9, 0.96), weight decay
0.045, warm-up), at the AutoNAT demo backbone's batch, learning rate and EMA; shorter (6,000 steps of 64)."""
from configs import demo_fashion_maskgit, maskgit
from configs.demo_backbone import pretrain
from configs.demo_fashion_backbone import fashion_run


def get_config():
    config = pretrain(demo_fashion_maskgit.get_config(), "output/demo_assets_fashion_mnist_maskgit")
    release = maskgit.get_config().train
    t = fashion_run(config.train, 6000)
    t.betas = release.betas
    t.weight_decay = release.weight_decay
    return config
