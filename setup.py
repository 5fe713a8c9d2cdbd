"""Build of the compiled CPU backend (Cython + OpenMP, one kernel per ISA inside).

The shipped build targets baseline x86-64: the AVX2 and AVX-512 kernels are compiled
through `#pragma GCC target` in kernels/flash_cpu.cpp and chosen at run time, so the
wheel runs on any x86-64 CPU.  Never add -march=native here.
-ffast-math stays off: the kernel masks with -inf and must see NaN.

FASTATTN_SANITIZE=1 builds the extension with AddressSanitizer and UndefinedBehaviorSanitizer
(every report fatal) under build/sanitize/, apart from the normal build's objects; the module
then needs libasan preloaded into the interpreter.  tools/sanitize.sh builds it and runs the
tests under it (docs/development.md).
"""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

CPU = "src/fastattn/backends/cpu"

compile_args = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
link_args = ["-fopenmp"]
if sys.platform == "darwin":  # Apple clang: OpenMP through libomp, if present
    compile_args = ["-O3", "-std=c++17", "-ffp-contract=fast", "-Xpreprocessor", "-fopenmp"]
    link_args = ["-lomp"]
if os.environ.get("FASTATTN_NO_OPENMP"):
    compile_args = [a for a in compile_args if "openmp" not in a and a != "-Xpreprocessor"]
    link_args = []

build_options = {}
if os.environ.get("FASTATTN_SANITIZE", "").strip() not in ("", "0"):
    sanitize = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
    compile_args = compile_args + sanitize + ["-fno-omit-frame-pointer", "-g"]
    link_args = link_args + sanitize
    # setuptools skips an extension whose module is newer than its sources, whatever the flags:
    # a separate build tree keeps sanitized and normal objects from standing in for each other
    build_options = {"build": {"build_base": "build/sanitize"}}

extensions = [
    Extension(
        "fastattn.backends.cpu._flash_cpu",
        sources=[f"{CPU}/_flash_cpu.pyx", f"{CPU}/kernels/flash_cpu.cpp"],
        include_dirs=[np.get_include(), CPU],
        depends=[f"{CPU}/kernels/{name}" for name in ("flash_cpu.h", "flash_tile.h", "decode_tile.h",
                                                           "flash_bwd_tile.h", "philox.h", "convert.h")],
        language="c++",
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}), options=build_options)
