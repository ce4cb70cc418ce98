"""Stand-in ``sglang`` package for the tests: only ``python -m sglang.launch_server``."""
