"""A tiny `make demo` for the tests (`python -m demo.run_demo --smoke`): same models and weights, few images and steps."""
from configs import demo


def get_config():
    config = demo.get_config()
    config.output_dir = "output/demo_smoke"
    config.train.n_steps = 3
    config.train.batch_size = 16
    config.train.log_interval = 1
    config.tokenizer_train.steps = 3
    config.tokenizer_train.kmeans_images = 16
    config.tokenizer_train.log_interval = 1

    d = config.demo
    d.data_root = "data/demo_smoke"
    d.train_per_class = 4
    d.val_per_class = 1
    d.fid_samples = 10
    d.grid_per_class = 1
    d.batch_size = 10
    return config
