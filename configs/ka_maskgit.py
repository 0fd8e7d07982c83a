"""KA on a frozen MaskGIT (KA-MaskGIT, the paper's "MaskGIT + KA" row): the graphs and the KA training recipe of
configs/ka_mig_l.py on the MaskGIT backbone, objective and sampler of configs/maskgit.py.

No KA-MaskGIT code or checkpoint was released: where the terms enter the post-LN layers is our choice
(docs/reference.md#ka-on-maskgit). Build the graphs from tokens of MaskGIT's own tokenizer with the same recipes:
`python extract_imagenet_feature.py --config configs/ka_maskgit.py ...`, then `python -m
graph_construction.build_graphs --tokens <those tokens> --out graph_prior/maskgit`. Train with
`train_graph.py --config configs/ka_maskgit.py` (frozen MaskGIT from assets/maskgit_imagenet256.safetensors; graph modules
and head trained), sample with `generate_img.py / generate_npz.py --config configs/ka_maskgit.py --checkpoint
<run>/model_ema.safetensors` (the release's sampler: the config's `sample` block).
"""
from configs import ka_mig_l, maskgit

KA_RECIPE = ("mode", "n_steps", "batch_size", "lr", "betas", "weight_decay", "warmup_steps", "save_interval",
             "log_interval")  # train keys taken from configs/ka_mig_l.py; the rest is the backbone's objective


def get_config():
    config = maskgit.get_config()
    config.run_name = "ka_maskgit"
    ka = ka_mig_l.get_config()
    config.graph = ka.graph      # G_co, G_s, G_p on, 3-layer GCNs, the same graph recipes
    config.graph.dir = "graph_prior/maskgit"  # graphs of MaskGIT-tokenizer tokens
    for key in KA_RECIPE:
        config.train[key] = ka.train[key]
    # train.init_checkpoint stays configs/maskgit.py's assets/maskgit_imagenet256.safetensors (the frozen backbone);
    # p_uncond stays 0: the release has no unconditional class
    return config
