"""Install megatron-normistral and build its C++ helpers (csrc/) at install time.

The extension ``megatron_normistral._helpers`` is compiled here, once, by pip. It is never
compiled at run time; if the build fails the install fails with the compiler's message, so a
broken toolchain cannot turn into a silently slower (or different) pure-Python path later.
"""
import glob
import shutil
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pragma: no cover - message for users without build isolation
    sys.exit("megatron-normistral: pybind11 is needed to build csrc/ (pip install pybind11)")


class BuildExtWithCompilerCheck(build_ext):
    """build_ext that says plainly when no C++ compiler is installed."""

    def run(self):
        compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if compiler is None:
            sys.exit(
                "megatron-normistral: no C++ compiler found (looked for c++, g++, clang++).\n"
                "The C++ helpers in csrc/ are built at install time and are required.\n"
                "Install one (Debian/Ubuntu: apt-get install g++) and run the install again."
            )
        super().run()


ext_modules = [
    Pybind11Extension(
        "megatron_normistral._helpers",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/*.h")),  # the shared core (helpers.h): a change rebuilds every .cpp
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="megatron-normistral",
    version="0.1.0",
    description="Megatron-core continual pretraining of Mistral-NeMo for the languages of Norway",
    packages=find_packages(include=["megatron_normistral", "megatron_normistral.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithCompilerCheck},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "sentencepiece",
        "nltk",
        "pybind11",
        "mistral-common",
        "transformers",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        # Used when importable, never required. Transformer Engine brings FP8 layers and fused
        # attention on NVIDIA GPUs; apex brings fused Adam/norms. Both need CUDA to build.
        "te": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "test": ["pytest", "hypothesis", "matplotlib"],
        # Parquet files and saved Hugging Face dataset folders as inputs (JSONL needs neither).
        "data": ["datasets", "pyarrow"],
        # Weights & Biases logging (--wandb-project); without the flag it is never needed.
        "wandb": ["wandb"],
    },
    zip_safe=False,
)
