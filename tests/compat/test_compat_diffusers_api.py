"""The diffusers API ditaccel relies on, pinned: a diffusers release that moves, renames or changes
one of these fails here, loudly, instead of somewhere inside a pipeline call.

Public API used: ``diffusers.hooks.ModelHook`` / ``HookRegistry`` (``check_if_exists_or_initialize``,
``register_hook``, ``remove_hook(name, recurse=...)``, ``hooks``), the ``new_forward`` /
``fn_ref.original_forward`` contract of a hook; scheduler ``timesteps`` / ``step_index`` /
``begin_index`` / ``set_begin_index``; pipeline ``transformer`` / ``scheduler`` / ``components``;
attention modules' ``processor`` / ``set_processor``; the transformer classes the adapters name,
their block lists and the argument names of their forwards; the per-call LoRA scale kwargs;
peft's tuner-layer attributes read by the engine's weight-change check.

Private API still used (flagged in docs/compatibility.md): ``module._diffusers_hook``, the attribute
where ``HookRegistry`` keeps a module's registry. diffusers has no public "registry of this module,
if any" accessor (``check_if_exists_or_initialize`` creates one); ditaccel reads it to find and
drop its own hooks (hooks/attach.py) and RAS reads it, and the registry's ``_hook_order``, to
check the order of its hooks (methods/ras.py). Both are pinned below. The scan at the end lists every private diffusers name ditaccel uses
(also ``_parallel_config`` in RAS and two FluxPipeline helpers in the reference-model training
code) and fails on any use not in its allow-list.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import diffusers
import ditaccel
from compat_helpers import rel_err
from ditaccel.adapters.registry import adapter_for, registered_families
from helpers.tiny import FAMILIES, call_kwargs, output_of, tiny_pipeline, tiny_transformer

ROOT = Path(__file__).resolve().parents[2]


def test_installed_diffusers_is_in_the_declared_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "diffusers")
    assert Version(diffusers.__version__) in spec.specifier, (diffusers.__version__, str(spec))


# ---------------------------------------------------------------------------------------------
# hooks


def test_hook_registry_contract():
    from diffusers.hooks import HookRegistry, ModelHook

    for name in ("check_if_exists_or_initialize", "register_hook", "remove_hook"):
        assert callable(getattr(HookRegistry, name)), name
    assert "recurse" in inspect.signature(HookRegistry.remove_hook).parameters

    class Double(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs) * 2

    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = layer(x)
    registry = HookRegistry.check_if_exists_or_initialize(layer)
    assert HookRegistry.check_if_exists_or_initialize(layer) is registry
    hook = Double()
    registry.register_hook(hook, "ditaccel.test")
    assert "ditaccel.test" in registry.hooks
    assert callable(hook.fn_ref.original_forward)
    assert torch.equal(layer(x), plain * 2)
    # private, pinned: where the registry lives (read by ditaccel/hooks/attach.py, methods/ras.py)
    assert layer.__dict__.get("_diffusers_hook") is registry
    assert list(registry._hook_order) == list(registry.hooks) == ["ditaccel.test"]  # private, read by RAS
    registry.remove_hook("ditaccel.test", recurse=False)
    assert not registry.hooks
    assert torch.equal(layer(x), plain)
    # what attach._drop_empty_registry deletes: the instance forward the registry left, a bound
    # method of the class's forward
    forward = layer.__dict__.get("forward")
    assert forward is None or forward.__func__ is type(layer).forward


# ---------------------------------------------------------------------------------------------
# schedulers and pipelines


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_scheduler_attributes(name):
    scheduler = getattr(diffusers, name)()
    scheduler.set_timesteps(6)
    assert isinstance(scheduler.timesteps, torch.Tensor) and len(scheduler.timesteps) == 6
    first = scheduler.timesteps
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2
    sample = torch.randn(1, 4, 4, 4)
    scheduler.step(torch.zeros_like(sample), scheduler.timesteps[2], sample)
    assert scheduler.step_index == 3  # counts from begin_index
    scheduler.set_timesteps(6)
    assert scheduler.timesteps is not first  # a new tensor per set_timesteps: the clock's new-generation signal


def test_scheduler_without_step_counter_still_has_timesteps():
    scheduler = diffusers.CogVideoXDDIMScheduler()
    scheduler.set_timesteps(4)
    assert isinstance(scheduler.timesteps, torch.Tensor)


def test_pipeline_attributes():
    pipe = tiny_pipeline("flux")
    assert isinstance(diffusers.DiffusionPipeline.components, property)
    assert pipe.components["transformer"] is pipe.transformer
    assert pipe.components["scheduler"] is pipe.scheduler


# ---------------------------------------------------------------------------------------------
# model classes, blocks, attention, argument names


def test_adapter_model_classes_exist():
    missing = [(family, cls) for family, entry in registered_families().items() for cls in entry.model_classes
               if not hasattr(diffusers, cls)]
    assert not missing, f"model classes named by adapters are gone from diffusers {diffusers.__version__}: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_attention_and_argument_names(family):
    model = tiny_transformer(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    forward_params = inspect.signature(type(model).forward).parameters
    assert adapter.hidden_arg in forward_params and adapter.timestep_arg in forward_params
    for group in adapter.block_groups:
        assert group.blocks, f"{family}: block list {group.name!r} is empty or gone"
        params = inspect.signature(type(group.blocks[0]).forward).parameters
        assert group.io.hidden_arg in params, (family, group.name, group.io.hidden_arg)
        if group.io.encoder_arg:
            assert group.io.encoder_arg in params, (family, group.name, group.io.encoder_arg)
    attention = adapter.attention_modules()
    assert attention, f"{family}: no attention module with processor/set_processor"
    for _, module in attention:
        assert module.processor is not None and callable(module.set_processor)


@pytest.mark.parametrize("family,kwarg", [("flux", "joint_attention_kwargs"), ("sd3", "joint_attention_kwargs"),
                                          ("wan", "attention_kwargs")])
def test_lora_scale_kwarg_names(family, kwarg):
    """The engine reads the per-call LoRA ``scale`` from these kwargs (weight-change check)."""
    assert kwarg in inspect.signature(type(tiny_transformer(family)).forward).parameters


def test_peft_tuner_layer_attributes():
    peft = pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_transformer("flux")
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="x")
    # the engine reads it from the instance dict (cheap; ModelMixin.__getattr__ is not)
    assert isinstance(vars(model).get("peft_config"), dict) and list(model.peft_config) == ["x"]
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers, peft.__version__
    for layer in layers:
        assert list(layer.active_adapters) == ["x"]
        assert list(layer.merged_adapters) == []
        assert layer.disable_adapters is False
        assert set(layer.scaling) == {"x"}


# ---------------------------------------------------------------------------------------------
# Qwen-Image on every supported diffusers


def test_qwenimage_with_unpadded_text_mask():
    """diffusers 0.35's QwenImagePipeline sizes the text RoPE by the mask's longest row and breaks
    on embeddings longer than that (tests/helpers/tiny.py pads one token, so the family tests of
    Qwen-Image fail on 0.35 for that reason alone). Real prompts come trimmed by ``encode_prompt``;
    with an unpadded mask Qwen-Image runs, and accelerates, on every supported diffusers."""
    pipe = tiny_pipeline("qwenimage")
    kw = call_kwargs("qwenimage", steps=6)
    kw["prompt_embeds_mask"] = torch.ones_like(kw["prompt_embeds_mask"])
    with torch.no_grad():
        ref = output_of("qwenimage", pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})).clone()
        with ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=2)) as handle:
            acc = output_of("qwenimage", pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})).clone()
            cached = handle.stats()["methods"]["StepCache"]["cached"]
        after = output_of("qwenimage", pipe(**{**kw, "generator": torch.Generator().manual_seed(0)}))
    assert cached > 0 and torch.isfinite(acc).all()
    assert rel_err(acc, ref) < 0.02
    assert torch.equal(after, ref)


# ---------------------------------------------------------------------------------------------
# no new private diffusers API
#
# The scan: every underscore name diffusers itself defines (``self._x = ``, ``obj._x = ``,
# ``def _x(``) that ditaccel reads (``._x``, ``getattr(obj, "_x")``, ``"_x" in``) without defining
# it itself. Each use must be listed here with its reason.

ALLOWED = {
    "ditaccel/hooks/attach.py": {"_diffusers_hook"},  # the registry of a module (no public accessor)
    # RAS: the registry and its private ``_hook_order`` (``list(registry.hooks)`` would do), and the
    # model's ``_parallel_config`` (context parallelism; getattr with a default, absent in 0.35)
    "ditaccel/methods/ras.py": {"_diffusers_hook", "_hook_order", "_parallel_config"},
    # training the reference checkpoints: FluxPipeline's static latent packing helpers
    "ditaccel/reference/train_flux.py": {"_pack_latents", "_prepare_latent_image_ids"},
    # feature detection of a diffusers version (hasattr), not a call
    "ditaccel/reference/pipelines.py": {"_resolve_dtype"},
}

_ASSIGNED = re.compile(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=|\w\.(_[a-z]\w*)\s*=|^\s+def (_[a-z]\w*)\(", re.M)
_OWN = re.compile(r"self\.(_[a-z]\w*)\s*(?::[^=\n]*)?=|def (_[a-z]\w*)\(|^\s*(_[a-z]\w*)\s*(?::[^=\n]*)?=|^class (_\w+)",
                  re.M)
_USED = re.compile(r"\.(_[a-z]\w*)\b|(?:getattr|hasattr|setattr|delattr)\([^,]+,\s*['\"](_[a-z]\w*)['\"]"
                   r"|['\"](_[a-z]\w*)['\"]\s+(?:not\s+)?in\s")


def _names(pattern, text):
    return {n for groups in pattern.findall(text) for n in (groups if isinstance(groups, tuple) else (groups,)) if n}


def test_no_other_private_diffusers_api_in_ditaccel():
    diffusers_private = set()
    for path in Path(diffusers.__file__).parent.rglob("*.py"):
        diffusers_private |= _names(_ASSIGNED, path.read_text(errors="ignore"))
    sources = {path.relative_to(ROOT).as_posix(): path.read_text() for path in sorted((ROOT / "ditaccel").rglob("*.py"))}
    own = set().union(*(_names(_OWN, text) for text in sources.values()))
    found = []
    for rel, text in sources.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            for name in _names(_USED, code):
                if name in diffusers_private and name not in own and name not in ALLOWED.get(rel, set()):
                    found.append(f"{rel}:{lineno}: {name}: {line.strip()}")
    assert not found, "private diffusers API used (see docs/compatibility.md):\n" + "\n".join(found)


def test_the_scan_finds_a_private_name():
    """The scan is not vacuous: the allowed names are among diffusers' private names."""
    diffusers_private = set()
    for path in Path(diffusers.__file__).parent.rglob("*.py"):
        diffusers_private |= _names(_ASSIGNED, path.read_text(errors="ignore"))
    assert {"_diffusers_hook", "_hook_order", "_step_index", "_begin_index"} <= diffusers_private
    assert _names(_USED, 'x = getattr(m, "_diffusers_hook", None); y = s._step_index') == {"_diffusers_hook", "_step_index"}
