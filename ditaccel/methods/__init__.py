"""One module per method: the algorithms. Importing this package registers every method."""

from . import step_cache  # noqa: F401
from .configs import (  # noqa: F401
    CLEARConfig,
    DeltaCacheConfig,
    HarmoniCaConfig,
    RettentionConfig,
    SVG2Config,
    TaylorSeerConfig,
)
from .ras import RASConfig  # noqa: F401
from .step_cache import StepCacheConfig  # noqa: F401
