"""A tiny `make demo BACKBONE=maskgit` for the tests (`python -m demo.run_demo --backbone maskgit --smoke`)."""
from configs import demo_fashion_maskgit
from configs.demo_smoke import shrink


def get_config():
    config = shrink(demo_fashion_maskgit.get_config())
    config.output_dir = "output/demo_fashion_maskgit_smoke"
    config.demo.data_root = "data/demo_fashion_smoke"
    return config
