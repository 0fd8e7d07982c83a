"""Pretraining of the demo backbone (`make demo-assets DATA=synthetic`): configs/demo.py in `pretrain` mode."""
from configs import demo


def pretrain(config, out: str):
    """The AutoNAT pretraining recipe (docs/reference.md#training-recipes) scaled to a small CPU run; shared with
    configs/demo_fashion_backbone.py, which trains longer."""
    config.run_name = "backbone"
    config.output_dir = out
    config.data.path = f"{out}/tokens/train"

    t = config.train
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


def get_config():
    return pretrain(demo.get_config(), "output/demo_assets_synthetic")
