"""Only the optional C extension lives here; everything else is in pyproject.toml.

``pytest_infmax.load._lane`` (chunked framing and SSE splitting of streaming responses)
halves the load generator's CPU per streamed event (docs/load-generator.md). It is
optional: where no C compiler is at hand the build goes on without it and the client
runs the same logic in Python (``INFMAX_WIRE=python`` chooses that path anyway).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_infmax.load._lane",
            ["pytest_infmax/load/_lane.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
