"""CPU demo on Fashion-MNIST with the MaskGIT host (`make demo BACKBONE=maskgit`): KA-MaskGIT on a small frozen
MaskGIT over 8x8 tokens of 32x32 photographs.

Everything but the backbone is configs/demo_fashion.py's: the same committed tokenizer, data, held-out set, FID
reference features, graphs, KA training (graph modules + head on the frozen backbone, same steps and learning
rate) and sampling schedule. The backbone is a post-LN MaskGIT transformer of the AutoNAT demo's width (5 layers,
as the AutoNAT demo's 5 blocks), pretrained by `make demo-assets BACKBONE=maskgit` with MaskGIT's own objective
(configs/demo_fashion_maskgit_backbone.py). Sampling uses no guidance (the MaskGIT release has no unconditional
class, and the backbone is trained without class dropout).
"""
from configs import demo_fashion, maskgit

BACKBONE_FILE = "maskgit_demo.safetensors"  # in demo/assets/fashion/, next to the AutoNAT demo backbone
OUT = "output/demo_maskgit"                 # everything `make demo BACKBONE=maskgit` writes
OBJECTIVE = ("label_smoothing", "p_uncond", "mask_schedule", "min_mask_rate", "loss_average")  # configs/maskgit.py


def get_config():
    config = demo_fashion.get_config()
    config.backbone = "maskgit"  # libs.models.factory: MaskGIT bare, KA-MaskGIT with the graphs
    config.run_name = "ka_maskgit"
    config.output_dir = OUT
    config.graph.dir = f"{OUT}/graphs"
    config.data.path = f"{OUT}/tokens/train"

    m = config.model
    m.depth = 5            # BERT layers (any number; the AutoNAT demo has 2 + 1 + 2 blocks)
    m.qkv_bias = True      # as the release

    release = maskgit.get_config().train
    for key in OBJECTIVE:  # MaskGIT's masking and loss also while KA trains (the backbone's objective)
        config.train[key] = release[key]
    config.train.init_checkpoint = f"{demo_fashion.ASSETS}/{BACKBONE_FILE}"

    s = config.sample
    s.cfg_scale = 0.0      # no unconditional class in MaskGIT's training

    d = config.demo
    d.backbone_file = BACKBONE_FILE
    d.train_tokenizer = False  # `make demo-assets`: reuse the committed tokenizer (AutoNAT's and MaskGIT's are one)
    d.shuffled_graphs = True   # the shuffled-graph KA as a 4th model: knowledge vs extra trained modules
    return config
