"""Small *trained* reference diffusion transformers (FLUX- and Wan-architecture) for measuring
the fidelity of inference accelerations against full compute.  See docs/reference_models.md."""

from ditaccel.reference.pipelines import (
    CHECKPOINT_ROOT,
    REFERENCE_MODELS,
    ReferenceModelError,
    ReferencePrompts,
    list_reference_models,
    load_reference_pipeline,
    load_reference_prompts,
    reference_call_kwargs,
    reference_model_path,
    trajectory_relative_change,
)

__all__ = [
    "CHECKPOINT_ROOT",
    "REFERENCE_MODELS",
    "ReferenceModelError",
    "ReferencePrompts",
    "list_reference_models",
    "load_reference_pipeline",
    "load_reference_prompts",
    "reference_call_kwargs",
    "reference_model_path",
    "trajectory_relative_change",
]
