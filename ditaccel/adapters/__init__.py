"""Model-family adapters (one module per family). Importing this package registers them all."""

from .base import BlockGroup, BlockIO, ModelAdapter, TokenLayout  # noqa: F401
from .registry import adapter_for, find_transformer, register_adapter, registered_families  # noqa: F401
from . import (  # noqa: F401,E402
    chroma,
    cogvideox,
    dit,
    flux,
    hunyuan_video,
    lumina2,
    ltx,
    pixart,
    qwenimage,
    sana,
    sd3,
    wan,
)
