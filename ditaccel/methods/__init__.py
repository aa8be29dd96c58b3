"""One module per method: the algorithms. Importing this package registers every method."""

from . import delta_cache, step_cache, taylorseer  # noqa: F401
from .clear import CLEARConfig  # noqa: F401
from .configs import (  # noqa: F401
    DeltaCacheConfig,
    TaylorSeerConfig,
)
from .harmonica import HarmoniCaConfig  # noqa: F401
from .ras import RASConfig  # noqa: F401
from .rettention import RettentionConfig  # noqa: F401
from .step_cache import StepCacheConfig  # noqa: F401
from .svg2 import SVG2Config  # noqa: F401
