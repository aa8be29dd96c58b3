"""The ComfyUI nodes (V3 schema): "DiT Accelerate", one advanced node per method, and the
HarmoniCa router loader. Node inputs of the method nodes are generated from the config
dataclasses (:mod:`.schema`); execution goes through :func:`.runtime.accelerate_model`."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io

import ditaccel
from ...config import MethodConfig, preset_description, preset_names, resolve_configs
from ...errors import ConfigError
from .parts import COMFY_READY_METHODS
from .runtime import SCOPES, accelerate_model
from .schema import (BOOL, CHOICE, DTYPE, FLOAT, INT, INT_LIMIT, INT_TUPLE, OPTIONAL_FLOAT, OPTIONAL_INT, STRING,
                     DEFAULT_FLOAT_MAX, DEFAULT_INT_MAX, FieldSpec, config_from_inputs, field_specs)

CATEGORY = "model_patches/ditaccel"
SCOPE_TOOLTIP = ("Where the step cache sits: 'blocks' caches the transformer blocks through ComfyUI block patches, "
                 "'model' caches the whole diffusion-model call; 'auto' picks blocks where the model supports it.")

# Methods whose ComfyUI plumbing exists (block patches, object patches of block children, the
# attention override). Nodes of the others are listed as experimental and raise a clear error when run.
COMFY_READY = {f"{name}Config" for name in COMFY_READY_METHODS}


def method_config_classes() -> list[type[MethodConfig]]:
    out = []
    for name in ditaccel.__all__:
        obj = getattr(ditaccel, name, None)
        if isinstance(obj, type) and issubclass(obj, MethodConfig) and obj is not MethodConfig:
            out.append(obj)
    return out


def _widget(spec: FieldSpec):
    common = {"tooltip": spec.tooltip}
    if spec.kind == INT:
        return io.Int.Input(spec.name, default=spec.default,
                            min=-INT_LIMIT if spec.minimum is None else int(spec.minimum),
                            max=DEFAULT_INT_MAX if spec.maximum is None else int(spec.maximum), **common)
    if spec.kind == OPTIONAL_INT:
        return io.Int.Input(spec.name, default=spec.default, min=-1,
                            max=DEFAULT_INT_MAX if spec.maximum is None else int(spec.maximum), **common)
    if spec.kind in (FLOAT, OPTIONAL_FLOAT):
        lo = spec.minimum
        if lo is not None and not spec.min_inclusive:
            lo = lo + 1e-4
        if spec.kind == OPTIONAL_FLOAT:
            lo = -1.0
        return io.Float.Input(spec.name, default=float(spec.default), min=-DEFAULT_FLOAT_MAX if lo is None else float(lo),
                              max=DEFAULT_FLOAT_MAX if spec.maximum is None else float(spec.maximum), step=0.001,
                              round=0.0001, **common)
    if spec.kind == BOOL:
        return io.Boolean.Input(spec.name, default=bool(spec.default), **common)
    if spec.kind in (CHOICE, DTYPE):
        return io.Combo.Input(spec.name, options=[str(c) for c in spec.choices], default=str(spec.default), **common)
    if spec.kind in (STRING, INT_TUPLE):
        return io.String.Input(spec.name, default=str(spec.default or ""), **common)
    raise TypeError(f"no widget for {spec}")


def _scope_input():
    return io.Combo.Input("cache_scope", options=list(SCOPES), default="auto", tooltip=SCOPE_TOOLTIP)


# The presets are ditaccel's own (ditaccel/presets.py): the same method configs as
# ``enable_acceleration(pipe, preset)`` on the diffusers path.
PRESET_ORDER = ("quality", "balanced", "fast", "off")


def comfy_presets() -> list[str]:
    names = preset_names()
    return [p for p in PRESET_ORDER if p in names] + [p for p in names if p not in PRESET_ORDER]


class DitAccelerate(io.ComfyNode):
    """The one-node entry: a preset plus the main schedule options."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        presets = comfy_presets()
        lines = "; ".join(f"{p}: {preset_description(p)}" for p in presets)
        return io.Schema(
            node_id="DitAccelerate",
            display_name="DiT Accelerate",
            category=CATEGORY,
            description=("Training-free acceleration of diffusion transformers (FLUX, SD3, Wan, HunyuanVideo, LTXV, "
                         "Lumina 2, Chroma, Qwen-Image) by ditaccel. Presets: " + lines),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion-transformer MODEL to accelerate (it is not changed)."),
                io.Combo.Input("preset", options=presets, default="balanced" if "balanced" in presets else presets[0],
                               tooltip="Speed/quality intent; the options below override the preset's values."),
                io.Int.Input("interval", default=0, min=0, max=1000,
                             tooltip="Compute in full every N steps and reuse/forecast in between, instead of "
                                     "the preset's adaptive schedule; 0 = the preset's schedule."),
                io.Int.Input("warmup_steps", default=-1, min=-1, max=1000,
                             tooltip="Steps always computed at the start; -1 = the preset's value."),
                io.Int.Input("final_steps", default=-1, min=-1, max=1000,
                             tooltip="Steps always computed at the end; -1 = the preset's value."),
                _scope_input(),
                io.Boolean.Input("verbose", default=False,
                                 tooltip="Log a summary (steps, reused segments) after every sampling run."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the MODEL with ditaccel attached.")],
        )

    @classmethod
    def execute(cls, model, preset: str = "balanced", interval: int = 0, warmup_steps: int = -1,
                final_steps: int = -1, cache_scope: str = "auto", verbose: bool = False) -> io.NodeOutput:
        overrides: dict[str, Any] = {}
        if interval > 0:
            overrides["interval"] = int(interval)
        if warmup_steps >= 0:
            overrides["warmup_steps"] = int(warmup_steps)
        if final_steps >= 0:
            overrides["final_steps"] = int(final_steps)
        if preset not in preset_names():
            raise ConfigError(f"Unknown preset {preset!r}; expected one of {comfy_presets()}.")
        configs = resolve_configs(preset, overrides)
        if interval > 0:  # a fixed interval replaces the presets' adaptive schedule
            configs = [c.replace(refresh_tolerance=0.0) if getattr(c, "refresh_tolerance", 0) > 0 else c
                       for c in configs]
        return io.NodeOutput(accelerate_model(model, configs, scope=cache_scope, verbose=verbose))


def make_method_node(config_cls: type[MethodConfig]) -> type[io.ComfyNode]:
    """An advanced node whose inputs are ``config_cls``'s fields."""
    method = config_cls.__name__.removesuffix("Config")
    specs = field_specs(config_cls)
    ready = config_cls.__name__ in COMFY_READY
    doc = (config_cls.__doc__ or method).strip().splitlines()[0]
    if not ready:
        doc += " (Not runnable in ComfyUI yet: running it raises an error that says so.)"

    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"DitAccel{method}",
            display_name=f"DiT Accel: {method}",
            category=f"{CATEGORY}/advanced",
            description=doc,
            is_experimental=not ready,
            inputs=[io.Model.Input("model")] + [_widget(s) for s in specs] + [_scope_input()],
            outputs=[io.Model.Output()],
        )

    def execute(cls, model, cache_scope: str = "auto", **values) -> io.NodeOutput:
        config = config_from_inputs(config_cls, values)
        return io.NodeOutput(accelerate_model(model, [config], scope=cache_scope))

    return type(f"DitAccel{method}Node", (io.ComfyNode,), {
        "__module__": __name__, "__doc__": doc, "CONFIG_CLASS": config_cls,
        "define_schema": classmethod(define_schema), "execute": classmethod(execute),
    })


class DitAccelHarmoniCaLoader(io.ComfyNode):
    """Loads a HarmoniCa router file (from `ditaccel train-router`, for this model's ComfyUI or diffusers
    class) and attaches the learned step x block cache router through block patches."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from ...methods import HarmoniCaConfig

        specs = {s.name: s for s in field_specs(HarmoniCaConfig)}
        inputs = [io.Model.Input("model"),
                  io.String.Input("router_path", default="", tooltip="Path of the router .safetensors file "
                                  "(trained with `ditaccel train-router`).")]
        inputs += [_widget(s) for name, s in specs.items() if name != "router"]
        return io.Schema(node_id="DitAccelHarmoniCaLoader", display_name="DiT Accel: Load HarmoniCa Router",
                         category=f"{CATEGORY}/advanced", description=" ".join(cls.__doc__.split()),
                         is_experimental=False,
                         inputs=inputs + [_scope_input()], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, router_path: str, cache_scope: str = "auto", **values) -> io.NodeOutput:
        import os

        from ...methods import HarmoniCaConfig

        path = os.path.expanduser(str(router_path).strip())
        if not path:
            raise ConfigError("DiT Accel: Load HarmoniCa Router needs router_path, the path of a router "
                              ".safetensors file.")
        if not os.path.isfile(path):
            raise ConfigError(f"HarmoniCa router file not found: {path!r}.")
        config = config_from_inputs(HarmoniCaConfig, {"router": path, **values})
        return io.NodeOutput(accelerate_model(model, [config], scope=cache_scope))


def node_list() -> list[type[io.ComfyNode]]:
    from ...methods import HarmoniCaConfig

    nodes: list[type[io.ComfyNode]] = [DitAccelerate]
    nodes += [make_method_node(c) for c in method_config_classes() if c is not HarmoniCaConfig]
    nodes.append(DitAccelHarmoniCaLoader)
    return nodes


class DitAccelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


def comfy_entrypoint() -> DitAccelExtension:
    return DitAccelExtension()
