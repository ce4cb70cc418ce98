# pytester drives the plugin the way users run it: a pytest run in a subprocess.
pytest_plugins = ["pytester"]
