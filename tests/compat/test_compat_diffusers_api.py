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
check the order of its hooks (methods/ras.py). Both are pinned below, and the scan at the end fails
when ditaccel starts using any other private diffusers name.
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
    assert isinstance(model.peft_config, dict) and list(model.peft_config) == ["x"]
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

_PRIVATE = re.compile(
    r"from diffusers[\w.]* import [^\n]*\b_[a-z]\w*"  # importing a private name
    r"|diffusers(?:\.\w+)*\._[a-z]\w*"  # diffusers.x._private
    r"|\b_diffusers_hook\b"  # the registry attribute (allowed where listed below)
    r"|\.(?:_step_index|_begin_index|_internal_dict|_execution_device|_callback_tensor_inputs"
    r"|_get_signature_keys|_joint_attention_kwargs|_attention_kwargs|_guidance_scale|_num_timesteps"
    r"|_interrupt|_fn_refs|_hook_order)\b"  # private attributes of pipelines, schedulers, registries
)
ALLOWED = {
    "ditaccel/hooks/attach.py": {"_diffusers_hook"},
    # RAS orders its hooks by the registry's private ``_hook_order``; ``list(registry.hooks)`` (an
    # insertion-ordered dict kept in step with it) would do the same through public API.
    "ditaccel/methods/ras.py": {"_diffusers_hook", "_hook_order"},
}


def test_no_other_private_diffusers_api_in_ditaccel():
    found = []
    for path in sorted((ROOT / "ditaccel").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for match in _PRIVATE.finditer(code):
                name = re.findall(r"_\w+", match.group(0))[-1]
                if name not in ALLOWED.get(rel, set()):
                    found.append(f"{rel}:{lineno}: {line.strip()}")
    assert not found, "private diffusers API used (see docs/compatibility.md):\n" + "\n".join(found)
