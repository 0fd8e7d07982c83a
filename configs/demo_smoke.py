"""A tiny `make demo DATA=synthetic` for the tests (`python -m demo.run_demo --dataset synthetic --smoke`)."""
from configs import demo


def shrink(config):
    """Tiny sizes for every stage of the demo drivers (same models and weights); shared by the smoke configs."""
    config.train.n_steps = 3
    config.train.batch_size = 16
    config.train.log_interval = 1
    config.tokenizer_train.steps = 3
    config.tokenizer_train.kmeans_images = 16
    config.tokenizer_train.log_interval = 1

    d = config.demo
    d.train_per_class = 4
    d.assets_train_per_class = 4
    d.heldout_per_class = 2
    d.fid_samples = 20
    d.fid_reference_per_class = 2
    d.fid_spread_subsets = 3
    d.grid_per_class = 1
    d.batch_size = 10
    d.sample_batch_size = 10
    d.nll_batch_size = 8
    d.curve_images = 10
    return config


def get_config():
    config = shrink(demo.get_config())
    config.output_dir = "output/demo_smoke"
    config.demo.data_root = "data/demo_smoke"
    return config
