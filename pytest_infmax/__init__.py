"""pytest-infmax: LLM inference SLA regression testing as pytest cases."""

__version__ = "0.1.0"
