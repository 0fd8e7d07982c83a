"""CPU demo on Fashion-MNIST (`make demo`): KA-MIG on a small frozen AutoNAT over 8x8 tokens of 32x32 photographs.

Same model sizes and training recipe as configs/demo.py; only the data, the committed weights and the held-out
set differ. Data: demo/fashion_mnist.py (the 28x28 gray images padded to 32x32 and copied into R, G, B).
"""
from configs import demo

ASSETS = "demo/assets/fashion"   # committed weights and FID reference features (`make demo-assets`)
OUT = "output/demo"              # everything `make demo` writes


def get_config():
    config = demo.get_config()
    config.output_dir = OUT
    config.tokenizer.checkpoint = f"{ASSETS}/vqgan_demo.safetensors"
    config.train.init_checkpoint = f"{ASSETS}/autonat_demo.safetensors"
    config.graph.dir = f"{OUT}/graphs"
    config.data.path = f"{OUT}/tokens/train"

    tt = config.tokenizer_train
    tt.steps = 4000
    tt.flip = False  # the shoes of Fashion-MNIST all point left; flipped images are not in the data
    tt.kmeans_images = 1024

    d = config.demo
    d.source = "fashion_mnist"
    d.data_root = "data/demo_fashion"
    # The demo's own steps (tokens, graphs, training of the graph modules) use 1,000 training images per class
    # (10,000 of 60,000), drawn with a fixed seed: tokenizing all 60,000 would cost about a minute of the
    # 10-minute budget. The tokenizer and the backbone (`make demo-assets`) were trained on all 60,000.
    d.train_per_class = 1000
    d.assets_train_per_class = 0    # 0 = the whole training split
    d.heldout_split = "test"
    d.heldout_per_class = 200       # 2,000 of the 10,000 test images, fixed seed (data_seed + 1)
    d.reference_features = "fid_reference_test.npz"  # in ASSETS; made by `make demo-assets`
    d.heldout_curve = True
    d.assets = ASSETS
    return config
