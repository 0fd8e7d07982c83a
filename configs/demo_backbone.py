"""Pretraining of the demo backbone (`make demo-assets`): configs/demo.py in `pretrain` mode."""
from configs import demo


def get_config():
    config = demo.get_config()
    config.run_name = "backbone"
    config.output_dir = "output/demo_assets"
    config.data.path = "output/demo_assets/tokens/train"

    t = config.train  # AutoNAT recipe (docs/reference.md#training-recipes) scaled to a small CPU run
    t.mode = "pretrain"
    t.init_checkpoint = ""
    t.n_steps = 2000
    t.batch_size = 64
    t.lr = 1e-3
    t.betas = (0.9, 0.99)
    t.weight_decay = 0.03
    t.warmup_steps = 100
    t.ema_rate = 0.995
    t.log_interval = 50
    t.save_interval = 500
    t.keep_checkpoints = 1
    return config
