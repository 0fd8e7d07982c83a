"""Pretraining of the Fashion-MNIST demo backbone (`make demo-assets`): configs/demo_fashion.py in `pretrain` mode."""
from configs import demo_fashion
from configs.demo_backbone import pretrain


def get_config():
    config = pretrain(demo_fashion.get_config(), "output/demo_assets_fashion_mnist")
    t = config.train  # the synthetic recipe, five times longer (60,000 real images)
    t.n_steps = 10000
    t.warmup_steps = 200
    t.ema_rate = 0.998
    t.save_interval = 500           # every checkpoint is kept: the held-out curve evaluates each
    t.keep_checkpoints = 1000
    return config
