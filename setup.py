"""Everything is declared in pyproject.toml but the one compiled part, which setuptools can only
take from here: the engine's magnitude kernels (sparsity_core/_engine/_bitkernels.c, plain C,
loaded with ctypes). It is optional: without a C compiler the package installs and the engine runs
its NumPy kernels instead (``sparsity_core._engine.native.AVAILABLE`` says which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sparsity_core._engine._bitkernels",
            ["sparsity_core/_engine/_bitkernels.c"],
            extra_compile_args=["-O3", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
