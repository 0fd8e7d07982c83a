"""MaskGIT on ImageNet 256: the official release converted to PyTorch (docs/reference.md#maskgit).

Weights: `python -m tools.convert_maskgit --tokenizer tokenizer_imagenet256_checkpoint --transformer
maskgit_imagenet256_checkpoint --out assets/` writes `assets/tokenizer_imagenet256.safetensors` (libs/models/vqgan.py)
and `assets/maskgit_imagenet256.safetensors` (libs/models/maskgit.py, built from the `model` block by
`libs.models.maskgit.maskgit_config`). The `sample` block is the release's sampler: cosine schedule, choice
temperature 4.5 annealed by (1 - t/T), sampling temperature 1, no guidance, 16 steps (its inference default; the
paper's ImageNet 256 table used 8). `libs.sampling.decoding.generate` runs it with this block
(`schedule_from_config`), as does `libs.sampling.maskgit_decode.decode` with its defaults.
"""
from configs import autonat_l


def get_config():
    config = autonat_l.get_config()
    config.run_name = "maskgit"
    config.backbone = "maskgit"  # libs.models.factory builds MaskGIT ('maskgit') or KAMaskGIT ('ka_maskgit')

    tok = config.tokenizer  # the same sizes as the MAGE tokenizer: the release's VQGAN
    tok.checkpoint = "assets/tokenizer_imagenet256.safetensors"

    m = config.model  # MaskGITConfig (field names shared with AutoNATConfig)
    m.codebook_size = 1024
    m.seq_len = 256
    m.num_classes = 1000
    m.embed_dim = 768
    m.depth = 24           # BERT layers
    m.num_heads = 16
    m.mlp_ratio = 4.0      # intermediate size 3072
    m.qkv_bias = True
    m.dropout = 0.1        # hidden and attention-probability dropout
    m.use_checkpoint = False

    t = config.train  # the release's class-conditional training recipe (maskgit_class_cond_config.py)
    t.init_checkpoint = "assets/maskgit_imagenet256.safetensors"
    t.n_steps = 2_000_000
    t.batch_size = 256
    t.lr = 1e-4
    t.betas = (0.9, 0.96)
    t.weight_decay = 0.045
    t.warmup_steps = 5000
    t.label_smoothing = 0.1
    t.p_uncond = 0.0       # no class dropout: the release has no unconditional class
    t.mask_schedule = "cosine"  # rate clip(cos(pi/2 * u), 1e-6, 1), u ~ U[0, 1) per sample (train.mask_beta unused)
    t.min_mask_rate = 0.5  # the release's min_masking_rate: the rate is at least 0.5
    t.loss_average = "samples"  # loss on masked places only: per-sample mean, then the batch mean

    s = config.sample
    s.schedule = "maskgit"
    s.steps = 16
    s.cfg_scale = 0.0
    s.temp = 4.5
    return config
