"""Error types. Every message says what was expected, what came, and how to fix it."""


class DitAccelError(Exception):
    """Base class of every error ditaccel raises on purpose."""


class ConfigError(DitAccelError, ValueError):
    """A configuration value, preset name or override is invalid."""


class UnsupportedModelError(DitAccelError, TypeError):
    """The model or pipeline is not a diffusion transformer ditaccel can find its way around."""


class CompositionError(DitAccelError, ValueError):
    """Two methods were asked to own the same module (two step caches, two sparse attentions)."""


def describe(value) -> str:
    """Short description of a value for error messages: its type and, when short, its repr."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"
