"""One module per method: the algorithms. Importing this package registers every method."""

from . import step_cache  # noqa: F401
from .configs import (  # noqa: F401
    CLEARConfig,
    DeltaCacheConfig,
    HarmoniCaConfig,
    RASConfig,
    RettentionConfig,
    SVG2Config,
    TaylorSeerConfig,
)
from .step_cache import StepCacheConfig  # noqa: F401
