"""Build of gradcomp's native exchange kernels (everything else is in pyproject.toml).

The kernels are one C++ extension, ``gradcomp.codec.kernels._native``, written against Python's
stable ABI and no torch header: it needs only a C++17 compiler, and one build serves every torch
version and every Python from 3.9 on. Where no compiler is found the build of the extension is
skipped (``optional=True``) and gradcomp installs without it; the exchange then runs its eager
reference kernels and logs one warning saying so.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = [f"gradcomp/codec/kernels/native/{name}.cpp" for name in ("module", "isa_generic", "isa_avx2", "isa_avx512")]
# -ffp-contract=off: no fused multiply-add, so the results are bit-identical to the eager reference
UNIX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden", "-Wno-maybe-uninitialized"]
MSVC_FLAGS = ["/O2", "/std:c++17", "/fp:precise"]


class BuildExt(build_ext):
    """Compile with the flags of the compiler at hand; say clearly when the kernels could not be built."""

    def build_extension(self, ext):
        flags = MSVC_FLAGS if self.compiler.compiler_type == "msvc" else UNIX_FLAGS
        ext.extra_compile_args = list(flags)
        try:
            super().build_extension(ext)
        except Exception as exc:  # optional=True lets the install go on; this says what happened
            sys.stderr.write(
                f"gradcomp: the native kernels were not built ({exc}); gradcomp will run its eager "
                "reference kernels, several times slower. Install a C++ compiler and reinstall to build them.\n"
            )
            raise


setup(
    ext_modules=[
        Extension(
            "gradcomp.codec.kernels._native",
            SOURCES,
            define_macros=[("Py_LIMITED_API", "0x03090000")],
            py_limited_api=True,
            depends=[f"gradcomp/codec/kernels/native/{h}.h" for h in ("common", "body", "x86_codes")],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
