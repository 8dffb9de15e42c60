"""The compiled passes of exactflow.native; all other metadata is in pyproject.toml.

The extension is plain C without PyTorch headers, so it builds in a second. It is optional:
where no C compiler is found, exactflow installs without it and trains by its PyTorch passes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "exactflow._native",
            sources=["src/exactflow/_native.c"],
            depends=["src/exactflow/_native_kernels.h"],
            extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-math-errno"],
            optional=True,
        )
    ]
)
