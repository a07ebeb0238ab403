"""Access to the compiled extension ``gemma4x._C``.

CPU code paths never touch it. A GPU path that needs it calls :func:`extension`, which
raises one clear error saying what is missing and how to build it.
"""

from __future__ import annotations

import functools
import importlib

_BUILD_HINT = (
    "Build it on a machine with the CUDA toolkit (nvcc) on PATH: `pip install .` "
    "(or `pip install --no-build-isolation -e .` offline). GEMMA4X_CUDA=OFF builds "
    "a CPU-only package, which cannot run GPU kernels."
)


class ExtensionUnavailableError(RuntimeError):
    """The compiled CUDA extension is missing or was built without CUDA."""


@functools.lru_cache(maxsize=1)
def _try_import():
    try:
        return importlib.import_module("gemma4x._C"), None
    except ImportError as exc:  # not built, or built for another Python / CUDA
        return None, exc


def extension():
    """Return ``gemma4x._C`` built with CUDA kernels, or raise ExtensionUnavailableError."""
    mod, exc = _try_import()
    if mod is None:
        raise ExtensionUnavailableError(f"gemma4x._C could not be imported ({exc}). {_BUILD_HINT}")
    if not mod.built_with_cuda():
        raise ExtensionUnavailableError(f"gemma4x._C was built without CUDA kernels. {_BUILD_HINT}")
    return mod


def cuda_kernels_available() -> bool:
    """True when the extension has CUDA kernels (does not check for a GPU)."""
    mod, _ = _try_import()
    return mod is not None and mod.built_with_cuda()
