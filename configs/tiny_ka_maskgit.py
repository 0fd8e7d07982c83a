"""configs/tiny.py's sizes on the MaskGIT backbone, with a graph block, for tests: seconds on a CPU.

Sampling builds KA-MaskGIT (the graph block: model kind `ka_maskgit`). Training as-is keeps configs/tiny.py's
`train.mode` `pretrain`: a bare tiny MaskGIT from a random init (configs/ka_maskgit.py's masking and loss). To train
the KA-MaskGIT graph modules on a frozen tiny MaskGIT (as tests/test_knowledge.py does), set the mode and its inputs:

    python train_graph.py --config configs/tiny_ka_maskgit.py --config.train.mode=ka_mig \\
        --config.train.init_checkpoint=<a configs/tiny_maskgit.py run>/model_ema.safetensors \\
        --config.graph.dir=<graph_construction.build_graphs output> --config.data.path=<token dataset>
"""
from configs import ka_maskgit, tiny
from configs.tiny_maskgit import tiny_sizes

OBJECTIVE = ("label_smoothing", "p_uncond", "mask_schedule", "min_mask_rate", "loss_average")


def get_config():
    small = tiny.get_config()
    config = tiny_sizes(ka_maskgit.get_config(), small)
    config.run_name = "tiny_ka_maskgit"
    objective = {k: config.train[k] for k in OBJECTIVE}
    config.train = small.train
    config.train.update(objective)  # MaskGIT's masking and loss (configs/maskgit.py), tiny sizes and steps
    config.graph.dir = ""
    return config
