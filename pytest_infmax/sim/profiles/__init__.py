"""Built-in simulator profiles: TOML data files read by :mod:`pytest_infmax.sim.roofline`."""
