"""SD3, Lumina 2, HunyuanVideo and LTXV in real ComfyUI: tiny random state dicts through ComfyUI's
loader (``comfy.sd.load_diffusion_model_state_dict`` with its model detection for SD3, HunyuanVideo
and LTXV; ComfyUI's model matching from an explicit config for Lumina 2, see tiny.py), sampled with
the KSampler node with and without the DiT Accelerate node. Writes what it measured as JSON.

    python tests/integrations/comfyui_families_worker.py OUT.json [family ...]
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfyui_worker as base  # noqa: E402  (puts ComfyUI on sys.path)

import ditaccel  # noqa: E402
from ditaccel.integrations.comfyui import tiny  # noqa: E402
from ditaccel.integrations.comfyui.parts import method_parts  # noqa: E402
from ditaccel.integrations.comfyui.runtime import SPEC_KEY, ComfyEngine, accelerate_model, last_stats  # noqa: E402
from ditaccel.integrations.comfyui.units import UnitModule  # noqa: E402

rel, run_node, node_defaults = base.rel, base.run_node, base.node_defaults


def units_left(model) -> int:
    return sum(isinstance(m, UnitModule) for m in model.model.diffusion_model.modules())


class StoredResiduals:
    """Test instrumentation: the largest |cached residual| of every step-cache segment, read from the
    run's engine just before it resets its methods at the end of a sampling run."""

    def __init__(self):
        self.values: list[float] = []

    def __enter__(self):
        self._finish = ComfyEngine.finish
        seen = self.values

        def finish(engine):
            for method in engine.methods:
                for seg in method_parts(method).segments:
                    seen.extend(float(st.dh.abs().max()) for st in seg.states.values() if st.dh is not None)
            return self._finish(engine)

        ComfyEngine.finish = finish
        return self

    def __exit__(self, *exc):
        ComfyEngine.finish = self._finish


def accelerate(model):
    """TaylorSeer on the attention/MLP modules (object patches), fixed interval 4, warm-up 3, final 1."""
    return run_node("DitAccelTaylorSeer", model=model, **{**node_defaults("DitAccelTaylorSeer"), "interval": 4,
                                                          "granularity": "module", "warmup_steps": 3, "final_steps": 1})


def sd3():
    m = tiny.tiny_sd3(seed=0)
    return m, tiny.text_conditioning(1, 64, pooled=32), tiny.text_conditioning(2, 64, pooled=32), \
        torch.zeros(1, 16, 8, 8)


def lumina2():
    m = tiny.tiny_lumina2(seed=0)
    return m, tiny.text_conditioning(1, 64), tiny.text_conditioning(2, 64), torch.zeros(1, 16, 8, 8)


def hunyuan_video():
    m = tiny.tiny_hunyuan_video(seed=0)
    return m, tiny.text_conditioning(1, 64, pooled=768), tiny.text_conditioning(2, 64, pooled=768), \
        torch.zeros(1, 16, 2, 8, 8)


def ltxv():
    m = tiny.tiny_ltxv(seed=0)
    mask = torch.ones(1, 16, dtype=torch.long)  # T5 token mask, as ComfyUI's LTXV text encoder gives it
    return m, tiny.text_conditioning(1, 4096, attention_mask=mask), \
        tiny.text_conditioning(2, 4096, attention_mask=mask), torch.zeros(1, 128, 2, 4, 4)


def family(name: str, build) -> dict:
    m, pos, neg, lat = build()
    options_before = repr(m.model_options)
    base8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    base6 = tiny.ksample(m, pos, neg, lat, steps=6, cfg=2.0)  # about the work of the cached run
    patched = accelerate(m)
    acc8 = tiny.ksample(patched, pos, neg, lat, steps=8, cfg=2.0)
    stats8 = last_stats(patched)
    units_loaded = units_left(m)  # object patches in place while the patched MODEL is loaded
    again8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    units_after = units_left(m)
    # per-run reset: another step count, then the 8-step run again, and a freshly patched MODEL
    acc5 = tiny.ksample(patched, pos, neg, lat, steps=5, cfg=2.0)
    stats5 = last_stats(patched)
    acc8_again = tiny.ksample(patched, pos, neg, lat, steps=8, cfg=2.0)
    stats8_again = last_stats(patched)
    fresh8 = tiny.ksample(accelerate(m), pos, neg, lat, steps=8, cfg=2.0)
    base5 = tiny.ksample(m, pos, neg, lat, steps=5, cfg=2.0)
    # the plain step cache: the residual it adds back on skipped steps must not be zero (ComfyUI's
    # blocks add in place, so a residual taken against the block's own input tensor is 0)
    residuals = StoredResiduals()
    with residuals:
        step_cache = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=2, final_steps=1,
                              cache_scope="auto")
        acc_sc = tiny.ksample(step_cache, pos, neg, lat, steps=8, cfg=2.0)
    # the adaptive schedule: its probe must measure a real error
    adaptive_config = ditaccel.TaylorSeerConfig(interval=4, threshold=0.05, warmup_steps=2)
    try:
        adaptive = accelerate_model(m, adaptive_config)
    except Exception as err:  # noqa: BLE001  (model scope: no block to probe)
        adaptive, adaptive_error = None, {"type": type(err).__name__, "message": str(err)}
    else:
        acc_ada, adaptive_error = tiny.ksample(adaptive, pos, neg, lat, steps=8, cfg=2.0), None
    # model scope: the whole call is the cached segment (SD3: the APPLY_MODEL call, see runtime.py)
    model_scope = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=2, final_steps=1,
                           cache_scope="model")
    acc_model = tiny.ksample(model_scope, pos, neg, lat, steps=8, cfg=2.0)
    return {
        "model_scope_stats": last_stats(model_scope),
        "model_scope_rel_err": rel(acc_model, base8),
        "model_base": type(m.model).__name__,
        "diffusion_model": type(m.model.diffusion_model).__name__,
        "stats8": stats8,
        "rel_err": rel(acc8, base8),
        "rel_err_base6_vs_base8": rel(base6, base8),
        "stats5": stats5,
        "stats8_again": stats8_again,
        "rel_err5": rel(acc5, base5),
        "rerun_identical": bool(torch.equal(acc8, acc8_again)),
        "fresh_identical": bool(torch.equal(acc8, fresh8)),
        "original_identical_after": bool(torch.equal(again8, base8)),
        "original_options_unchanged": repr(m.model_options) == options_before,
        "original_has_spec": SPEC_KEY in m.model_options.get("transformer_options", {}),
        "units_loaded": units_loaded,
        "units_after_original": units_after,
        "step_cache_stats": last_stats(step_cache),
        "step_cache_rel_err": rel(acc_sc, base8),
        "step_cache_residual_max": residuals.values,
        "adaptive_error": adaptive_error,
        "adaptive_stats": last_stats(adaptive) if adaptive is not None else None,
        "adaptive_rel_err": rel(acc_ada, base8) if adaptive is not None else None,
    }


FAMILIES = {"sd3": sd3, "lumina2": lumina2, "hunyuan_video": hunyuan_video, "ltxv": ltxv}


def main(out_path: str, parts: list[str]) -> None:
    torch.manual_seed(0)
    R: dict = {"errors": {}}
    base.discovery(R)  # registers the nodes through ComfyUI's custom-node loader
    for name, build in FAMILIES.items():
        if parts and name not in parts:
            continue
        try:
            R[name] = family(name, build)
        except Exception:  # noqa: BLE001
            R["errors"][name] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
