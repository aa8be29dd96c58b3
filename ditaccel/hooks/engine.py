"""The engine: one per accelerated transformer. It owns the step clock, the installed methods
and the statistics, and runs them around every transformer call through one top-level hook."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..adapters.base import ModelAdapter, read_arg
from ..errors import CompositionError
from .attach import attach_top_hook, detach_top_hook
from .distributed import RankSync
from .flops import FlopProfile, FlopProfiler
from .method import InstalledMethod
from .step_clock import StepClock, StepInfo

TRANSFORMER_HOOK = "engine"


@dataclass
class CallState:
    """One transformer call as the methods see it."""

    info: StepInfo
    args: tuple
    kwargs: dict
    profile: FlopProfile | None = None
    profiler: FlopProfiler | None = None
    skipped_flops: float = 0.0
    scratch: dict = field(default_factory=dict)
    # NaN/Inf guard (see Engine._needs_rerun): ``force_full`` tells every method to compute this call
    # in full and refresh its caches from it; ``rerun`` marks a call whose output must be recomputed.
    force_full: bool = False
    rerun: bool = False
    approx_before: int = 0


# Counters that grow when a method returns something other than the full computation.
APPROXIMATION_COUNTERS = ("cached", "forecast", "sparse", "sparse_calls")


def all_finite(output: Any) -> bool:
    """True when every floating tensor in ``output`` (tensor, tuple/list, dict / BaseOutput) is finite."""
    if isinstance(output, torch.Tensor):
        return not output.is_floating_point() or bool(torch.isfinite(output).all())
    if isinstance(output, dict):
        return all(all_finite(v) for v in output.values())
    if isinstance(output, (tuple, list)):
        return all(all_finite(v) for v in output)
    return True


class _TransformerHook(ModelHook):
    def __init__(self, engine: "Engine"):
        super().__init__()
        self.engine = engine

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        call = engine.begin_call(args, kwargs)
        output = engine.end_call(call, self._forward(call))
        if call.rerun:  # an approximated result was not finite: the same call again, in full
            call = engine.begin_rerun(call)
            output = engine.end_call(call, self._forward(call))
        return output

    def _forward(self, call: CallState):
        if call.profiler is not None:
            with call.profiler:
                output = self.fn_ref.original_forward(*call.args, **call.kwargs)
            self.engine.record_profile(call)
            return output
        return self.fn_ref.original_forward(*call.args, **call.kwargs)


class Engine:
    def __init__(self, adapter: ModelAdapter, pipeline=None, count_flops: bool = True, nan_guard: bool = True,
                 sync_ranks: bool | str = "auto"):
        self.adapter = adapter
        self.model: nn.Module = adapter.model
        self.pipeline = pipeline
        self.clock = StepClock(pipeline)
        self.methods: list[InstalledMethod] = []
        self.count_flops = count_flops
        self.current_call: CallState | None = None
        self._profiles: dict[Any, FlopProfile] = {}
        self._signature = None
        self._hook_attached = False
        # Weight-change detection (LoRA loaded / switched / rescaled / fused after enable): see
        # _weights_key. ``_lora_layers`` is the cached list of peft tuner layers, rebuilt only when
        # the set of loaded adapter names changes; ``_weights_seen`` holds the last (sampled, full) keys.
        self._weights_seen: Any = (None, None)
        self._lora_names: Any = None
        self._lora_layers: list[nn.Module] = []
        self.weight_changes = 0
        # NaN/Inf guard and rank agreement (every data-dependent decision goes through ``sync``).
        self.nan_guard = nan_guard
        self.sync = RankSync(sync_ranks)
        self.nonfinite_fallbacks = 0
        self._warned: set[str] = set()
        self.totals = {"generations": 0, "steps": 0, "transformer_calls": 0, "flops_full": 0.0, "flops_skipped": 0.0}

    # -- install / remove (transactional) -------------------------------------------------------
    def install(self, methods: list[InstalledMethod]) -> None:
        owners: dict[tuple[str, int], tuple[str, str]] = {}
        for method in methods:
            for kind, module, module_name in method.claims():
                key = (kind, id(module))
                if key in owners and owners[key][0] != method.name:
                    other = owners[key][0]
                    raise CompositionError(
                        f"{method.name} and {other} both want to be the {kind} of {module_name!r}. "
                        f"One module can have one {kind}: drop one of them, or restrict their block/layer "
                        "ranges so they do not overlap."
                    )
                if key in owners:
                    raise CompositionError(f"{method.name} was given twice for the {kind} of {module_name!r}.")
                owners[key] = (method.name, module_name)
        installed: list[InstalledMethod] = []
        try:
            attach_top_hook(self.model, _TransformerHook(self), TRANSFORMER_HOOK)
            self._hook_attached = True
            for method in methods:
                method.install()
                installed.append(method)
        except BaseException:
            for method in reversed(installed):
                method.remove()
            if self._hook_attached:
                detach_top_hook(self.model, TRANSFORMER_HOOK)
                self._hook_attached = False
            raise
        self.methods = installed

    def remove(self) -> None:
        for method in reversed(self.methods):
            method.remove()
        self.methods = []
        if self._hook_attached:
            detach_top_hook(self.model, TRANSFORMER_HOOK)
            self._hook_attached = False
        self.current_call = None

    # -- per call ---------------------------------------------------------------------------------
    def _signature_of(self, args: tuple, kwargs: dict):
        hidden = read_arg(self.model, self.adapter.hidden_arg, args, kwargs)
        encoder = read_arg(self.model, "encoder_hidden_states", args, kwargs)
        return (
            tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None,
            hidden.dtype if isinstance(hidden, torch.Tensor) else None,
            tuple(encoder.shape) if isinstance(encoder, torch.Tensor) else None,
        )

    def begin_call(self, args: tuple, kwargs: dict) -> CallState:
        signature = self._signature_of(args, kwargs)
        timestep = read_arg(self.model, self.adapter.timestep_arg, args, kwargs)
        info = self.clock.tick(timestep, signature)
        # Weights changed since the previous call (a LoRA loaded, unloaded, switched, rescaled,
        # fused or unfused): every cached residual / feature / attention pattern was computed by
        # other weights, so forget it, as for a new input signature, and re-profile the FLOPs
        # (LoRA layers add matmuls). A new generation resets the methods anyway; this also covers
        # changes in the middle of a generation (a step-end callback calling set_adapters) and
        # hosts that drive the clock without announcing a new generation.
        # Every call compares a sampled key (O(1)); the first call of a generation also compares
        # the key of every LoRA layer.
        sampled, full = self._weights_key(kwargs, full=info.new_generation)
        seen_sampled, seen_full = self._weights_seen
        if seen_sampled is not None and (sampled != seen_sampled or (full is not None and full != seen_full)):
            if full is None:  # a change seen in the middle of a generation: keep the full key current
                full = self._layer_states(self._lora_layers)
            self.weight_changes += 1
            self._profiles.clear()
            if not info.reset:
                info = dataclasses.replace(info, reset=True)
        self._weights_seen = (sampled, full if full is not None else seen_full)
        if info.reset:
            for method in self.methods:
                method.reset()
        call = CallState(info=info, args=args, kwargs=kwargs)
        if self.count_flops:
            call.profile = self._profiles.get(signature)
            if call.profile is None:
                call.profiler = FlopProfiler(self._profiled_modules())
        self._signature = signature
        self.current_call = call
        t = self.totals
        t["transformer_calls"] += 1
        if info.new_generation:
            t["generations"] += 1
        if info.branch == 0:
            t["steps"] += 1
        call.approx_before = self._approximations()
        for method in self.methods:
            method.begin_call(call)
        return call

    def begin_rerun(self, failed: CallState) -> CallState:
        """The call ``failed`` again, with every method told to compute in full (``force_full``)."""
        self.nonfinite_fallbacks += 1
        self._warn_once("nonfinite", f"a cached, forecast or sparse result was not finite (NaN/Inf) at step "
                        f"{failed.info.step}; this transformer call was recomputed in full and the caches refreshed "
                        "from it. Later occurrences are counted in handle.stats()['nonfinite_fallbacks'].")
        call = CallState(info=failed.info, args=failed.args, kwargs=failed.kwargs, profile=failed.profile,
                         force_full=True)
        self.current_call = call
        for method in self.methods:
            method.begin_call(call)
        return call

    def _approximations(self) -> int:
        return sum(int(m.counters.get(k, 0)) for m in self.methods for k in APPROXIMATION_COUNTERS)

    def _needs_rerun(self, call: CallState, output: Any) -> bool:
        """After a call in which some method approximated: is the output non-finite (on any rank)?"""
        if not self.nan_guard:
            return False
        if call.force_full:
            if not all_finite(output):
                self._warn_once("model_nonfinite", "the full model itself produced a non-finite output "
                                "(NaN/Inf) on a call recomputed without any approximation; returned as is.")
            return False
        if call.skipped_flops <= 0 and self._approximations() == call.approx_before:
            return False  # nothing approximated (same on every rank: the decisions are agreed)
        return self.sync.agree(not all_finite(output))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"ditaccel: {message}", RuntimeWarning, stacklevel=4)

    def _weights_key(self, kwargs: dict, full: bool) -> tuple[tuple, tuple | None]:
        """What the effective weights depend on beyond the values of the base parameters.

        Covers what diffusers' LoRA API changes: the loaded adapter names (``load_lora_weights``,
        ``delete_adapters``, ``unload_lora_weights``), each LoRA layer's active adapters,
        per-adapter scaling and enable flag (``set_adapters``, ``enable/disable_lora``), its merged
        adapters (``fuse_lora`` / ``unfuse_lora``), and the per-call LoRA ``scale`` of
        ``joint_attention_kwargs`` / ``attention_kwargs``. No tensor is read.

        Returns (sampled, full). ``sampled`` (every call, O(1)): adapter names, call scale and the
        state of up to 8 evenly spaced LoRA layers; diffusers' API changes all layers alike, so
        this sees set_adapters / fuse / enable / disable in the middle of a generation.
        ``full`` (first call of a generation only, else None): the state of every LoRA layer
        (a FLUX-dev LoRA on all linears has ~400; ~1-3 us each).
        Not covered within one generation: changes to only some layers outside the sample
        (per-block scale dicts), in-place edits of parameter values (``load_state_dict``, LoRA
        hotswap); the per-generation reset covers those between generations.
        """
        extra = kwargs.get("joint_attention_kwargs") or kwargs.get("attention_kwargs")
        call_scale = extra.get("scale") if isinstance(extra, dict) else None
        peft_config = vars(self.model).get("peft_config")  # instance attribute set by peft's injection
        names = tuple(peft_config) if isinstance(peft_config, dict) else ()
        if names != self._lora_names:
            self._lora_names = names
            self._lora_layers = self._find_lora_layers() if names else []
        layers = self._lora_layers
        step = max(1, len(layers) // 8)
        sampled = (names, call_scale, self._layer_states(layers[::step][:8] + layers[-1:]))
        return sampled, (self._layer_states(layers) if full else None)

    @staticmethod
    def _layer_states(layers) -> tuple:
        return tuple(
            (tuple(layer.active_adapters), tuple(layer.merged_adapters), layer.disable_adapters,
             tuple(getattr(layer, "scaling", {}).values()))
            for layer in layers
        )

    def _find_lora_layers(self) -> list[nn.Module]:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # adapters named in peft_config but peft not importable: nothing to watch
            return []
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def _profiled_modules(self) -> list[nn.Module]:
        modules = [block for _, block, _ in self.adapter.blocks()]
        modules += [attn for _, attn in self.adapter.attention_modules()]
        for _, block, _ in self.adapter.blocks():  # attention + MLP submodules (per-module caches)
            modules += [m for _, m in self.adapter.compute_modules(block)]
        return list({id(m): m for m in modules}.values())

    def record_profile(self, call: CallState) -> None:
        call.profile = call.profiler.profile()
        self._profiles[self._signature] = call.profile
        call.profiler = None

    def end_call(self, call: CallState, output: Any) -> Any:
        for method in reversed(self.methods):
            output = method.end_call(call, output)
        if self._needs_rerun(call, output):
            call.rerun = True  # the hook runs the call again with force_full; nothing counted for this one
            self.current_call = None
            return output
        if call.profile is not None:
            self.totals["flops_full"] += call.profile.total
            self.totals["flops_skipped"] += min(call.skipped_flops, call.profile.total)
        self.current_call = None
        return output

    def flops_of(self, module: nn.Module) -> int:
        """FLOPs of ``module`` in the current call's profile (0 before the profile exists)."""
        call = self.current_call
        if call is None or call.profile is None:
            return 0
        return call.profile.of(module)

    # -- stats ------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        for key in self.totals:
            self.totals[key] = 0 if isinstance(self.totals[key], int) else 0.0
        self.weight_changes = 0
        self.nonfinite_fallbacks = 0
        for method in self.methods:
            method.counters.clear()

    def stats(self) -> dict[str, Any]:
        t = self.totals
        full = t["flops_full"]
        return {
            "family": self.adapter.family,
            "generations": t["generations"],
            "steps": t["steps"],
            "transformer_calls": t["transformer_calls"],
            "methods": {m.name: m.stats() for m in self.methods},
            "flops_full": full,
            "flops_computed": full - t["flops_skipped"],
            "flops_skipped_fraction": (t["flops_skipped"] / full) if full else 0.0,
            "bytes_held": int(sum(m.bytes_held() for m in self.methods)),
            "weight_changes": self.weight_changes,  # resets caused by LoRA changes (see _weights_key)
            "nonfinite_fallbacks": self.nonfinite_fallbacks,  # calls recomputed in full by the NaN/Inf guard
        }
