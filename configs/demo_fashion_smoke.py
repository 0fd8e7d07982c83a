"""A tiny `make demo` for the tests (`python -m demo.run_demo --smoke --fashion-mnist <folder of small idx files>`)."""
from configs import demo_fashion
from configs.demo_smoke import shrink


def get_config():
    config = shrink(demo_fashion.get_config())
    config.output_dir = "output/demo_fashion_smoke"
    config.demo.data_root = "data/demo_fashion_smoke"
    return config
