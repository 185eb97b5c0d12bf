"""The one compiled part: the copy and scan kernels (see src/weightport/_kernels.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found the
install still succeeds, and weightport.copying falls back to torch's own copy.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightport._kernels",
            ["src/weightport/_kernels.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
            py_limited_api=True,
        )
    ]
)
