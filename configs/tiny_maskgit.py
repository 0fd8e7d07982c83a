"""A tiny MaskGIT (configs/tiny.py's sizes) with the release's pretraining recipe of configs/maskgit.py for tests:
`train.mode = pretrain` from a random init, seconds on a CPU."""
from configs import maskgit, tiny


def tiny_sizes(config, small):
    """configs/tiny.py's tokenizer and model (`small`) on a MaskGIT config; shared with configs/tiny_ka_maskgit.py."""
    config.tokenizer = small.tokenizer
    config.model = small.model
    config.model.depth = 3        # any number of layers (no U-ViT pairs)
    config.model.qkv_bias = True  # as the release
    config.data.path = ""
    config.sample.steps = 4
    return config


def get_config():
    config = tiny_sizes(maskgit.get_config(), tiny.get_config())
    config.run_name = "tiny_maskgit"

    t = config.train  # the recipe (optimizer, warm-up, masking, loss) stays configs/maskgit.py's; only the run shrinks
    t.init_checkpoint = ""        # a fresh backbone
    t.n_steps = 20
    t.batch_size = 16
    t.mixed_precision = "no"
    t.log_interval = 5
    t.save_interval = 10
    return config
