"""Build of mdarts and its compiled extension mdarts_kernels._C.

C++ CPU kernels are always built. CUDA kernels are added when the installed torch is a CUDA
build and nvcc is found; ``MDARTS_CUDA=1`` requires them (the build fails otherwise) and
``MDARTS_CUDA=0`` skips them. ``TORCH_CUDA_ARCH_LIST`` is respected (default "8.0;9.0").
CUDA_HOME is found here (a real ``bin/nvcc`` beside ``include/cuda_runtime.h``), because
torch's own guess follows the first ``nvcc`` on PATH, which may be a wrapper script.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _is_cuda_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> "str | None":
    """The CUDA toolkit folder: $CUDA_HOME/$CUDA_PATH if valid, else the usual places."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if candidate and _is_cuda_toolkit(Path(candidate)):
            return str(Path(candidate).resolve())
    return None


def want_cuda(cuda_home: "str | None") -> bool:
    """Whether to compile the CUDA kernels, honouring MDARTS_CUDA (auto, 0 or 1)."""
    import torch

    setting = os.environ.get("MDARTS_CUDA", "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        sys.exit(f"MDARTS_CUDA: expected 0, 1 or auto, got {setting!r}")
    if setting == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) found; set CUDA_HOME")
    if problems and setting == "1":
        sys.exit("MDARTS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    if problems:
        print("mdarts: building without CUDA kernels: " + "; ".join(problems), file=sys.stderr)
    return not problems


def nvidia_include_dirs() -> "list[str]":
    """Header folders of the nvidia-* wheels a CUDA build of torch brings (cusparse.h etc.)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    build_cuda = want_cuda(cuda_home)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    common = dict(include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        common["include_dirs"] += nvidia_include_dirs()
        ext = CUDAExtension(
            "mdarts_kernels._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, **common
        )
    else:
        ext = CppExtension("mdarts_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
