"""ditaccel: training-free inference acceleration for diffusion transformers.

    import ditaccel
    handle = ditaccel.enable_acceleration(pipe)      # preset "balanced"
    image = pipe(prompt, num_inference_steps=28).images[0]
    handle.remove()                                  # or ditaccel.disable_acceleration(pipe)
"""

from . import adapters  # noqa: F401  (registers the model families)
from . import methods  # noqa: F401  (registers the methods)
from . import presets  # noqa: F401  (registers the presets)
from .api import AccelerationHandle, accelerated, disable_acceleration, enable_acceleration, get_handle
from .config import MethodConfig, preset_names, register_method
from .errors import CompositionError, ConfigError, DitAccelError, UnsupportedModelError
from .methods import (
    CLEARConfig,
    DeltaCacheConfig,
    HarmoniCaConfig,
    RASConfig,
    RettentionConfig,
    StepCacheConfig,
    SVG2Config,
    TaylorSeerConfig,
)

__version__ = "0.1.0"

__all__ = [
    "AccelerationHandle", "accelerated", "disable_acceleration", "enable_acceleration", "get_handle",
    "MethodConfig", "preset_names", "register_method",
    "CompositionError", "ConfigError", "DitAccelError", "UnsupportedModelError",
    "StepCacheConfig", "DeltaCacheConfig", "TaylorSeerConfig", "HarmoniCaConfig", "RASConfig",
    "SVG2Config", "RettentionConfig", "CLEARConfig",
]
