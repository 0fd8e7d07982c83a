"""A tiny KA-MaskGIT (configs/tiny.py's sizes on the MaskGIT backbone) for tests: seconds on a CPU."""
from configs import ka_maskgit, tiny

OBJECTIVE = ("label_smoothing", "p_uncond", "mask_schedule", "min_mask_rate", "loss_average")


def get_config():
    config = ka_maskgit.get_config()
    small = tiny.get_config()
    config.run_name = "tiny_ka_maskgit"
    config.tokenizer = small.tokenizer
    config.model = small.model
    config.model.depth = 3       # any number of layers (no U-ViT pairs)
    config.model.qkv_bias = True  # as the release
    objective = {k: config.train[k] for k in OBJECTIVE}
    config.train = small.train
    config.train.update(objective)  # MaskGIT's masking and loss (configs/maskgit.py), tiny sizes and steps
    config.graph.dir = ""
    config.data.path = ""
    config.sample.steps = 4
    return config
