"""Lazy loader for the small CUDA extension in csrc/ (fused q/k/v row permutation).

``load_extension()`` JIT-builds csrc/bindings.cpp + csrc/permute_gather.cu with
torch.utils.cpp_extension.load the first time it is called on a machine with CUDA, and returns
None when CUDA is unavailable or the build fails (with a warning), so callers fall back to torch
indexing.  ``permute_rows`` is the user-facing function and works on any device.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = (_CSRC / "bindings.cpp", _CSRC / "permute_gather.cu")


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled extension module, or None (no CUDA, sources missing, or build failed)."""
    if not torch.cuda.is_available():
        return None
    if not all(p.is_file() for p in SOURCES):
        warnings.warn(f"ditaccel CUDA sources not found under {_CSRC} (installed without csrc/?); "
                      "using torch indexing instead", RuntimeWarning, stacklevel=2)
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="ditaccel_permute_rows", sources=[str(p) for p in SOURCES],
                    extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as exc:  # compiler missing, CUDA/torch mismatch, ...
        warnings.warn(f"could not build the ditaccel CUDA extension ({type(exc).__name__}: {exc}); "
                      "using torch indexing instead", RuntimeWarning, stacklevel=2)
        return None


def _check(tensors, index):
    if not isinstance(tensors, (list, tuple)) or not 1 <= len(tensors) <= 3:
        raise TypeError(f"tensors must be a list of 1 to 3 tensors (e.g. [q, k, v]), got {type(tensors).__name__}"
                        + (f" of length {len(tensors)}" if isinstance(tensors, (list, tuple)) else ""))
    first = tensors[0]
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"every tensor must be (B, H, L, D) with the shape/dtype/device of tensors[0] "
                             f"{tuple(first.shape)} {first.dtype} {first.device}; tensors[{i}] is "
                             f"{tuple(x.shape)} {x.dtype} {x.device}")
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}; convert with index.long()")
    if tuple(index.shape) != tuple(first.shape[:3]):
        raise ValueError(f"index must have shape (B, H, L) = {tuple(first.shape[:3])}, got {tuple(index.shape)}")
    if index.device != first.device:
        raise ValueError(f"index must be on {first.device} like the tensors, got {index.device}")


def permute_rows(tensors, index: torch.Tensor, inverse: bool = False) -> list[torch.Tensor]:
    """Reorder the sequence dim of each (B, H, L, D) tensor by a permutation ``index`` (B, H, L).

    inverse=False: out[b, h, i] = x[b, h, index[b, h, i]]  (gather into cluster order)
    inverse=True : out[b, h, index[b, h, i]] = x[b, h, i]  (scatter back to the original order)
    One fused CUDA launch for all tensors when the extension is available, else torch indexing.
    """
    _check(tensors, index)
    if tensors[0].is_cuda:
        ext = load_extension()
        if ext is not None:
            with torch.cuda.device(tensors[0].device):
                stream = torch.cuda.current_stream().cuda_stream
                return list(ext.permute_rows(list(tensors), index, bool(inverse), stream))
    idx = index.long().unsqueeze(-1).expand(*tensors[0].shape)
    if inverse:
        return [torch.empty_like(x).scatter_(2, idx, x) for x in tensors]
    return [torch.gather(x, 2, idx) for x in tensors]
