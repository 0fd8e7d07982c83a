"""Pretraining of the Fashion-MNIST demo backbone (`make demo-assets`): configs/demo_fashion.py in `pretrain` mode."""
from configs import demo_fashion
from configs.demo_backbone import pretrain


def fashion_run(t, n_steps: int):
    """The synthetic recipe's run lengthened for 60,000 real images (train block `t`); shared with the MaskGIT
    demo backbone (configs/demo_fashion_maskgit_backbone.py)."""
    t.n_steps = n_steps
    t.warmup_steps = 200
    t.ema_rate = 0.998
    t.save_interval = 500           # every checkpoint is kept: the held-out curve evaluates each
    t.keep_checkpoints = 1000
    return t


def get_config():
    config = pretrain(demo_fashion.get_config(), "output/demo_assets_fashion_mnist")
    fashion_run(config.train, 10000)  # five times the synthetic run
    return config
