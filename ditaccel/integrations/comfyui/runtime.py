"""ComfyUI plumbing for ditaccel's methods: wrappers, block patches, object patches and the
attention override on a MODEL clone.

The method objects are the diffusers path's own: ``apply_function_for(config)(engine, config)``
(:mod:`.builders`; HarmoniCa and RAS with ComfyUI's model facts) builds the same objects
(schedules, residual caches, Taylor series, routers, token selection) that ``enable_acceleration``
installs with module hooks. Here nothing is hooked: the engine reads each method's parts
(:mod:`.parts`) and decides *where their code runs* (module units: :mod:`.units`; attention:
:mod:`.attention`; RAS's token regions: :mod:`.ras`):

* ``OUTER_SAMPLE`` wrapper: one :class:`ComfyEngine` per sampling run, made from the sigmas the
  sampler was given (fresh state every run: new step count, resolution, batch size);
* ``DIFFUSION_MODEL`` wrapper: per call, the step index from the current sigma against the run's
  sigmas, and the CFG branch from ``transformer_options["cond_or_uncond"]``; methods' ``begin_call``
  / ``end_call`` around the call; for families whose forward has no block patches, the whole call
  is the cached segment;
* ``patches_replace["dit"]`` block patches (``set_model_patch_replace``): the first block of a
  segment asks the method whether to compute; skipped calls return input + cached residual, later
  blocks of a skipped segment pass their input through; the last block of a computed segment
  stores the residual.

The input MODEL is never changed: :func:`accelerate_model` works on ``model.clone()``, and every
piece of state lives in per-run objects, reached through ``transformer_options``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import Any, Sequence

import torch

from ...adapters.base import pack_output, unpack_output
from ...config import MethodConfig
from ...attention.dispatch import AttentionSite
from ...errors import CompositionError, ConfigError, describe
from ...hooks.distributed import RankSync
from ...hooks.engine import CallState
from ...hooks.segment_cache import SegmentCache
from ...hooks.step_clock import StepClock
from ...hooks.token_select import as_kwargs
from .adapter import ATTENTION_UNIT, MODULE_UNIT, build_adapter, unit_key
from .builders import build_method
from .attention import OVERRIDE_KEY, AttentionArgs, AttentionOverride
from .families import PATCH_NAME, SCOPE_BLOCKS, SCOPE_MODEL, runs_diffusion_model_wrappers
from .parts import check_ready, method_parts
from .units import UnitModule, run_unit

log = logging.getLogger("ditaccel.comfyui")

WRAPPER_KEY = "ditaccel"
SPEC_KEY = "ditaccel"  # transformer_options[SPEC_KEY]: the AccelSpec of a patched MODEL
RUN_KEY = "ditaccel_run"  # transformer_options[RUN_KEY]: the ComfyEngine of the running sampling run

_CURRENT_RUN: contextvars.ContextVar["ComfyEngine | None"] = contextvars.ContextVar("ditaccel_comfy_run", default=None)


def current_run() -> "ComfyEngine | None":
    """The engine of the sampling run whose diffusion-model call is executing (None outside one)."""
    return _CURRENT_RUN.get()

SCOPES = ("auto", SCOPE_BLOCKS, SCOPE_MODEL)

ENTRY_DIFFUSION_MODEL = "diffusion_model"
ENTRY_APPLY_MODEL = "apply_model"


class AccelSpec:
    """What a patched MODEL carries: the method configs and options (immutable), plus ``history``,
    the stats of the sampling runs made with this MODEL (most recent last, at most 16)."""

    def __init__(self, configs: Sequence[MethodConfig], scope: str = "auto", latent_channels: int | None = None,
                 verbose: bool = False):
        self.configs = tuple(configs)
        self.scope = scope
        self.latent_channels = latent_channels
        self.verbose = bool(verbose)
        self.history: list[dict[str, Any]] = []

    @property
    def scope_request(self) -> str | None:
        return None if self.scope == "auto" else self.scope

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: configs are immutable
        return AccelSpec(self.configs, self.scope, self.latent_channels, self.verbose)

    def __repr__(self) -> str:
        return f"AccelSpec({[c.method_name for c in self.configs]}, scope={self.scope})"


class ComfyEngine:
    """The engine of one sampling run: what ditaccel's methods see as ``engine``.

    It offers the part of :class:`ditaccel.hooks.engine.Engine` the segment-based methods use
    (``adapter``, ``model``, ``clock``, ``current_call``, ``flops_of``) and is driven by the ComfyUI
    wrappers instead of module hooks.
    """

    count_flops = False

    def __init__(self, spec: AccelSpec, model_patcher, sigmas: torch.Tensor | None):
        self.spec = spec
        self.adapter, self.scope, keys = build_adapter(model_patcher, spec.scope_request)
        self.model = self.adapter.model
        # Where a call starts: the DIFFUSION_MODEL wrapper, or APPLY_MODEL for a diffusion model
        # whose forward does not run DIFFUSION_MODEL wrappers.
        self.entry = ENTRY_DIFFUSION_MODEL if runs_diffusion_model_wrappers(self.model) else ENTRY_APPLY_MODEL
        self.pipeline = None
        self.latent_channels = spec.latent_channels
        self.sigmas = None if sigmas is None else sigmas.detach().float().reshape(-1).cpu()
        self.total_steps = None if self.sigmas is None else max(int(self.sigmas.numel()) - 1, 1)
        self.clock = StepClock()
        self.clock.begin_generation(self.total_steps)
        self.current_call: CallState | None = None
        # One ComfyUI process samples on one device: decisions need no agreement across ranks.
        self.sync = RankSync(False)
        for c in spec.configs:
            check_ready(c)
        self.block_keys = keys
        self.methods = [build_method(self, c) for c in spec.configs]
        self.block_map: dict[tuple[str, int], tuple[SegmentCache, int]] = {}
        self.probe_map: dict[tuple[str, int], list] = {}
        self.unit_map: dict[tuple, tuple] = {}  # unit key -> (ModuleCache, index)
        self.model_segment: SegmentCache | None = None
        self.sparse = None
        self.token_selection = None  # RAS (ComfyRAS): drives the block patches and the attention override
        owner: dict[int, str] = {}
        for method in self.methods:
            parts = method_parts(method)
            self._add_segments(method, parts.segments, owner)
            for probe in parts.probes:
                if id(probe.block) not in keys:
                    raise ConfigError(
                        f"{method.name} with an adaptive schedule (threshold > 0) probes the first block every step, "
                        f"which needs block patches; the {self.adapter.family} model runs in {self.scope} scope. "
                        "Use threshold 0 (fixed schedule) or cache scope 'blocks' where the family has block patches.")
                self.probe_map.setdefault(keys[id(probe.block)], []).append(probe)
            for cache in parts.module_caches:
                for i, (name, module) in enumerate(cache.modules):
                    self.unit_map[self.adapter.unit_keys[id(module)]] = (cache, i)
            if parts.sparse is not None:
                self._add_sparse(parts.sparse)
            if parts.token_selection is not None:
                self.token_selection = parts.token_selection
        self.current_block: tuple[str, int] | None = None
        self._attention_calls: dict[tuple[str, int], int] = {}
        self._sites: dict[tuple, AttentionSite] = {}
        self._layer_index = {key: i for i, key in enumerate(keys[id(b)] for _, b in self.adapter.attention_modules())}
        self.branch_ids: dict[tuple, int] = {}
        self.totals = {"transformer_calls": 0, "steps": 0, "segments_computed": 0, "segments_skipped": 0,
                       "model_calls_skipped": 0}
        self._steps_seen: set[int] = set()
        self.step_log: list[tuple[int, int, bool]] = []  # (step, branch, computed) per call, first segment

    def __deepcopy__(self, memo):  # ComfyUI may deep-copy transformer_options; the run is shared, never copied
        return self

    def __copy__(self):
        return self

    def _add_segments(self, method, segments: list[SegmentCache], owner: dict[int, str]) -> None:
        for seg in segments:
            for name, block, _ in seg.entries:
                if id(block) in owner:
                    if owner[id(block)] == method.name:
                        raise ConfigError(
                            f"{method.name} caches {name!r} in two block ranges, which ComfyUI's block patches cannot "
                            "nest (a model or segment of one block). Give it disjoint ranges, or use the StepCache.")
                    raise CompositionError(
                        f"{method.name} and {owner[id(block)]} both want to be the step cache of {name!r}. "
                        "Use one step-cache method per model."
                    )
                owner[id(block)] = method.name
            if self.scope == SCOPE_BLOCKS:
                for j, (_, block, _) in enumerate(seg.entries):
                    self.block_map[self.block_keys[id(block)]] = (seg, j)
            else:
                self.model_segment = seg

    def _add_sparse(self, method) -> None:
        if self.sparse is not None:
            raise CompositionError(f"{method.name} and {self.sparse.name} both want to own the attention; use one "
                                   "sparse-attention method per model.")
        if self.scope != SCOPE_BLOCKS or self.adapter.token_layout_fn is None:
            supported = "flux, chroma, wan"
            lacks = "no described token layout" if self.scope == SCOPE_BLOCKS else "no block patches"
            raise ConfigError(
                f"{method.name} in ComfyUI needs block patches (cache scope 'blocks') and a known token layout; the "
                f"{self.adapter.family} model in {self.scope} scope has {lacks}. "
                f"Sparse attention runs in ComfyUI for: {supported}.")
        self.sparse = method

    # -- what accelerate_model attaches --------------------------------------------------------------
    @property
    def needs_attention_override(self) -> bool:
        return (self.sparse is not None or self.token_selection is not None
                or any(k[0] == ATTENTION_UNIT for k in self.unit_map))

    def object_patch_paths(self) -> dict[str, tuple]:
        """``diffusion_model.<blocks>.<i>.<child>`` -> unit key, for every module unit."""
        attrs = {g.kind: g.attr for g in self.adapter.comfy_family.groups}
        return {f"diffusion_model.{attrs[k[1]]}.{k[2]}.{k[3]}": k for k in self.unit_map if k[0] == MODULE_UNIT}

    # -- engine interface used by the methods ------------------------------------------------------
    def flops_of(self, module) -> int:
        return 0

    # -- per call ------------------------------------------------------------------------------------
    def step_of(self, sigma) -> int:
        """Index of the sampling step whose interval [sigmas[i], sigmas[i+1]) holds ``sigma``."""
        if self.sigmas is None or sigma is None:
            return 0
        value = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        schedule = self.sigmas[:-1]
        tol = 1e-5 * max(1.0, abs(value))
        idx = int((schedule >= value - tol).sum().item()) - 1
        return min(max(idx, 0), self.total_steps - 1)

    def begin_call(self, x: torch.Tensor, transformer_options: dict, context=None,
                   named: dict | None = None) -> CallState:
        """``named``: the diffusion model's call arguments by name (methods read e.g. ``ref_latents``,
        ``control`` from them); ``context`` alone where they are not known."""
        sigma = transformer_options.get("sigmas")
        step = self.step_of(sigma)
        self.clock.set_step(step, self.total_steps)
        info = self.clock.tick(sigma, None)
        cond_or_uncond = tuple(int(c) for c in (transformer_options.get("cond_or_uncond") or ()))
        key = (cond_or_uncond, tuple(x.shape), x.dtype)
        branch = self.branch_ids.setdefault(key, len(self.branch_ids))
        info = dataclasses.replace(info, branch=branch)
        if info.reset:
            for method in self.methods:
                method.reset()
        kwargs = {k: v for k, v in (named or {}).items() if k not in ("x", "transformer_options")}
        kwargs.setdefault("context", context)
        call = CallState(info=info, args=(x,), kwargs=kwargs)
        self.current_call = call
        self.totals["transformer_calls"] += 1
        if step not in self._steps_seen:
            self._steps_seen.add(step)
            self.totals["steps"] += 1
        for method in self.methods:
            method.begin_call(call)
        return call

    def end_call(self, call: CallState, output):
        for method in reversed(self.methods):
            output = method.end_call(call, output)
        self.current_call = None
        return output

    def _enter(self, seg: SegmentCache, h: torch.Tensor, e: torch.Tensor | None) -> None:
        # A residual of another token count (new context length in the same branch) is useless.
        st = seg.states.get(seg.branch)
        if st is not None and st.dh is not None and (
                st.dh.shape != h.shape or (e is not None and st.de is not None and st.de.shape != e.shape)):
            seg.states.pop(seg.branch, None)
        seg.enter(h, e)
        self.totals["segments_skipped" if seg.skipping else "segments_computed"] += 1
        call = self.current_call
        if call is not None and (not self.step_log or self.step_log[-1][:2] != (call.info.step, call.info.branch)):
            self.step_log.append((call.info.step, call.info.branch, not seg.skipping))

    # -- block patches -------------------------------------------------------------------------------
    def run_block(self, kind: str, index: int, args: dict, compute):
        outer = self.current_block
        self.current_block = (kind, index)
        self._attention_calls[(kind, index)] = 0
        try:
            return self._run_block(kind, index, args, compute)
        finally:
            self.current_block = outer

    def _run_block(self, kind: str, index: int, args: dict, compute):
        if self.token_selection is not None:  # RAS runs alone (see .ras.build_ras)
            return self.token_selection.run_block(kind, index, args, compute)
        probes = self.probe_map.get((kind, index))
        if probes:
            # ComfyUI's blocks add their residuals in place (FLUX/HunyuanVideo ``img += ...``): the
            # input must be copied before the block runs, or the probe sees output - output = 0.
            h_in = args["img"].clone()
            out = compute(args)
            for probe in probes:
                if out["img"].shape == h_in.shape:
                    probe.on_probe(h_in, out["img"])
            return out
        entry = self.block_map.get((kind, index))
        if entry is None:
            return compute(args)
        seg, position = entry
        io = seg.entries[position][2]
        two_streams = io.encoder_arg is not None
        h = args["img"]
        e = args.get("txt") if two_streams else None
        if position == 0:
            # The segment keeps its input to take the residual at the last block; ComfyUI's blocks
            # change their input tensors in place, so it keeps a copy (else the residual is 0).
            self._enter(seg, h.clone(), None if e is None else e.clone())
            if seg.skipping:
                h_out, e_out = unpack_output(io, seg.skipped_output(io, h, e))
                return {"img": h_out, "txt": e_out} if two_streams else {"img": h_out}
        elif seg.skipping:
            return {"img": h, "txt": e} if two_streams else {"img": h}
        out = compute(args)
        if position == len(seg.entries) - 1:
            seg.exit(io, pack_output(io, out["img"], out.get("txt") if two_streams else None))
        return out

    # -- module units and attention -----------------------------------------------------------------
    def run_unit(self, key: tuple, compute):
        entry = self.unit_map.get(key)
        if entry is None:
            return compute()
        return run_unit(entry[0], entry[1], compute)

    def _site(self, block: tuple[str, int], n: int) -> AttentionSite:
        site = self._sites.get((block, n))
        if site is None:
            site = self._sites[(block, n)] = AttentionSite(f"{block[0]}.{block[1]}.attention{n}", None,
                                                           self._layer_index.get(block, 0), n)
        return site

    def run_attention(self, a: AttentionArgs, dense):
        block = self.current_block
        if block is None or not a.usable:
            return dense()
        n = self._attention_calls.get(block, 0)
        self._attention_calls[block] = n + 1

        def compute():
            if self.token_selection is not None:
                out = self.token_selection.attend(self._site(block, n), a)
                return dense() if out is None else out
            if self.sparse is None:
                return dense()
            out = self.sparse.attend(self._site(block, n), a.to_bhld(a.q), a.to_bhld(a.k), a.to_bhld(a.v), a.mask,
                                     None)
            return dense() if out is None else a.from_bhld(out)

        if n == 0:
            return self.run_unit(unit_key(block[0], block[1], None), compute)
        return compute()

    # -- whole-model segment -------------------------------------------------------------------------
    def run_model(self, x: torch.Tensor, compute):
        seg = self.model_segment
        if seg is None:
            return compute()
        io = seg.entries[0][2]
        channels = self.latent_channels
        h = x[:, :channels] if channels and x.ndim > 1 and x.shape[1] > channels else x
        self._enter(seg, h, None)
        if seg.skipping:
            self.totals["model_calls_skipped"] += 1
            return seg.skipped_output(io, h, None)
        out = compute()
        if isinstance(out, torch.Tensor):
            seg.exit(io, out)
        return out

    # -- end of run ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        t = self.totals
        computed = sum(m.counters.get("computed", 0) for m in self.methods)
        cached = sum(m.counters.get("cached", 0) + m.counters.get("forecast", 0) for m in self.methods)
        return {
            "family": self.adapter.family,
            "scope": self.scope,
            "total_steps": self.total_steps,
            "steps": t["steps"],
            "transformer_calls": t["transformer_calls"],
            "branches": len(self.branch_ids),
            "segments_computed": t["segments_computed"],
            "segments_skipped": t["segments_skipped"],
            "blocks_computed": int(computed),
            "blocks_cached": int(cached),
            "block_skip_fraction": (cached / (computed + cached)) if (computed + cached) else 0.0,
            "methods": {m.name: m.stats() for m in self.methods},
            "step_log": list(self.step_log),
        }

    def finish(self) -> dict[str, Any]:
        stats = self.stats()
        for method in self.methods:
            method.reset()
        history = self.spec.history
        history.append(stats)
        del history[:-16]
        names = "+".join(m.name for m in self.methods)
        msg = (f"ditaccel {names} ({stats['family']}, {stats['scope']} scope): {stats['steps']} steps, "
               f"{stats['transformer_calls']} model calls; {stats['segments_skipped']} of "
               f"{stats['segments_skipped'] + stats['segments_computed']} cached segments reused "
               f"({100 * stats['block_skip_fraction']:.0f}% of block calls skipped).")
        ras = stats["methods"].get("RAS")
        if ras is not None:
            tokens = ras.get("tokens_computed", 0) + ras.get("tokens_reused", 0)
            msg += (f" RAS: {ras.get('sparse_calls', 0)} sparse calls, "
                    f"{100 * ras.get('tokens_reused', 0) / max(tokens, 1):.0f}% of their image tokens reused.")
        (log.info if self.spec.verbose else log.debug)(msg)
        return stats


# ---------------------------------------------------------------------------------------------------
# ComfyUI callables. Module-level functions and small picklable objects: ModelPatcher.clone()
# deep-copies model_options, and copies of these stay correct because they hold no run state.


def _find_transformer_options(args: tuple, kwargs: dict) -> dict | None:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict) and (RUN_KEY in a or "cond_or_uncond" in a or "patches_replace" in a or "wrappers" in a):
            return a
    return None


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE: a fresh ComfyEngine for this sampling run; removed and summarised afterwards."""
    guider = executor.class_obj
    orig_options = guider.model_options
    import comfy.model_patcher

    guider.model_options = comfy.model_patcher.create_model_options_clone(orig_options)
    to = guider.model_options.setdefault("transformer_options", {})
    spec = to.get(SPEC_KEY)
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    engine = ComfyEngine(spec, guider.model_patcher, sigmas) if isinstance(spec, AccelSpec) else None
    if engine is not None:
        to[RUN_KEY] = engine
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig_options
        if engine is not None:
            engine.finish()


def _run_call(engine: ComfyEngine, x: torch.Tensor, to: dict, context, compute, named: dict | None = None):
    call = engine.begin_call(x, to, context, named)
    token = _CURRENT_RUN.set(engine)
    try:
        if engine.scope == SCOPE_MODEL:
            output = engine.run_model(x, compute)
        else:
            output = compute()
    finally:
        _CURRENT_RUN.reset(token)
    return engine.end_call(call, output)


def diffusion_model_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL: step and CFG branch of this call; methods around it; whole-model segment."""
    to = _find_transformer_options(args, kwargs)
    engine = to.get(RUN_KEY) if to is not None else None
    if (not isinstance(engine, ComfyEngine) or engine.entry != ENTRY_DIFFUSION_MODEL or not args
            or not isinstance(args[0], torch.Tensor)):
        return executor(*args, **kwargs)
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    named = as_kwargs(engine.model, args, kwargs) if engine.token_selection is not None else None
    return _run_call(engine, args[0], to, context, lambda: executor(*args, **kwargs), named)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """APPLY_MODEL (``BaseModel.apply_model``): the same as :func:`diffusion_model_wrapper`, for models
    whose diffusion model does not run DIFFUSION_MODEL wrappers (SD3's MMDiT in ComfyUI 0.3.75). In
    model scope the cached segment is then the whole apply_model call (latent in, denoised out)."""
    to = transformer_options if isinstance(transformer_options, dict) else {}
    engine = to.get(RUN_KEY)

    def compute():
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    if not isinstance(engine, ComfyEngine) or engine.entry != ENTRY_APPLY_MODEL or not isinstance(x, torch.Tensor):
        return compute()
    return _run_call(engine, x, to, c_crossattn, compute)


class BlockPatch:
    """A ``patches_replace["dit"][(kind, index)]`` entry. ``previous`` is a patch another node had
    set on the same block (kept and called when the block is computed)."""

    def __init__(self, kind: str, index: int, previous=None):
        self.kind = kind
        self.index = index
        self.previous = previous

    def __call__(self, args: dict, extra: dict):
        to = args.get("transformer_options")
        engine = to.get(RUN_KEY) if isinstance(to, dict) else None
        if not isinstance(engine, ComfyEngine):
            engine = _CURRENT_RUN.get()
        if self.previous is not None:
            previous = self.previous

            def compute(a):
                return previous(a, extra)
        else:
            compute = extra["original_block"]
        if engine is None:
            return compute(args)
        return engine.run_block(self.kind, self.index, args, compute)

    def __repr__(self) -> str:
        return f"ditaccel.BlockPatch({self.kind}, {self.index})"


def _strip_own_patches(model_patcher) -> None:
    """Take out what an earlier ditaccel node attached to this clone (restoring what it wrapped)."""
    to = model_patcher.model_options.get("transformer_options", {})
    dit = to.get("patches_replace", {}).get(PATCH_NAME, {})
    for key, patch in list(dit.items()):
        if isinstance(patch, BlockPatch):
            if patch.previous is not None:
                dit[key] = patch.previous
            else:
                del dit[key]
    override = to.get(OVERRIDE_KEY)
    if isinstance(override, AttentionOverride):
        if override.previous is not None:
            to[OVERRIDE_KEY] = override.previous
        else:
            del to[OVERRIDE_KEY]
    for path, obj in list(model_patcher.object_patches.items()):
        if isinstance(obj, UnitModule):
            del model_patcher.object_patches[path]


def _original_module(model_patcher, path: str):
    obj = model_patcher.get_model_object(path)
    while isinstance(obj, UnitModule):
        obj = obj.original
    return obj


def accelerate_model(model, configs: MethodConfig | Sequence[MethodConfig], scope: str = "auto",
                     verbose: bool = False):
    """A clone of the ComfyUI MODEL with ditaccel's methods attached through ComfyUI's own patch
    mechanisms (wrappers, block replace patches, object patches of block children, the attention
    override). The input MODEL is not changed. Errors (unsupported model, method or combination) are
    raised here, when the node runs, not in the middle of sampling."""
    if isinstance(configs, MethodConfig):
        configs = [configs]
    configs = list(configs)
    if not configs or not all(isinstance(c, MethodConfig) for c in configs):
        raise ConfigError(f"accelerate_model needs method configs, got {describe(configs)}.")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {list(SCOPES)}, got {describe(scope)}.")
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    spec = AccelSpec(configs, scope, getattr(latent_format, "latent_channels", None), verbose)
    probe = ComfyEngine(spec, model, None)  # validates family, scope, methods and their composition

    import comfy.patcher_extension as pe

    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    to[SPEC_KEY] = spec
    for wrapper_type, fn in ((pe.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                             (pe.WrappersMP.APPLY_MODEL, apply_model_wrapper),
                             (pe.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
    _strip_own_patches(patched)
    if probe.scope == SCOPE_BLOCKS:
        # every block gets a patch: the engine follows which block runs (attention sites, units)
        existing = to.get("patches_replace", {}).get(PATCH_NAME, {})
        for kind, index in sorted(probe.block_keys.values()):
            patched.set_model_patch_replace(BlockPatch(kind, index, existing.get((kind, index))), PATCH_NAME, kind, index)
    for path, key in sorted(probe.object_patch_paths().items()):
        patched.add_object_patch(path, UnitModule(_original_module(patched, path), key, current_run))
    if probe.needs_attention_override:
        to = patched.model_options["transformer_options"]  # set_model_patch_replace made a new one
        to[OVERRIDE_KEY] = AttentionOverride(current_run, to.get(OVERRIDE_KEY))
    return patched


def spec_of(model) -> AccelSpec | None:
    """The AccelSpec of a MODEL made by a ditaccel node (None for any other MODEL)."""
    spec = getattr(model, "model_options", {}).get("transformer_options", {}).get(SPEC_KEY)
    return spec if isinstance(spec, AccelSpec) else None


def last_stats(model) -> dict[str, Any] | None:
    """Stats of the most recent sampling run with a MODEL made by a ditaccel node."""
    spec = spec_of(model)
    return spec.history[-1] if spec is not None and spec.history else None
