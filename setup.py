"""Builds the host-side C++ extension `engine._C` (KV page allocator, radix prefix tree, the CPU
sampler's row loop).

Plain C++17 through pybind11 and the system compiler: no CUDA, no torch headers, so the
package builds on any machine that has a C++ compiler and the Python headers.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "engine._C",
        sources=["csrc/bindings.cpp", "csrc/page_allocator.cpp", "csrc/radix_tree.cpp", "csrc/sampler.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
