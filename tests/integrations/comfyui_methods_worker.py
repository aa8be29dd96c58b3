"""TaylorSeer, Δ-Cache and the sparse attentions inside real ComfyUI; writes what it measured as JSON.

Started by tests/integrations/test_comfyui_methods.py in its own process (see comfyui_worker.py
for why). Models are ComfyUI's own (tiny, random), nodes are called as ComfyUI's executor calls
them, sampling is ComfyUI's KSampler node.

    python tests/integrations/comfyui_methods_worker.py OUT.json [part ...]
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
from ditaccel.config import resolve_configs  # noqa: E402
from ditaccel.integrations.comfyui import tiny  # noqa: E402
from ditaccel.integrations.comfyui.runtime import SPEC_KEY, accelerate_model, last_stats, spec_of  # noqa: E402
from ditaccel.integrations.comfyui.units import UnitModule  # noqa: E402

rel, run_node, node_defaults, BlockCounter = base.rel, base.run_node, base.node_defaults, base.BlockCounter
error_of = base.error_of


def run_method_node(node_id: str, model, **inputs):
    return run_node(node_id, model=model, **{**node_defaults(node_id), **inputs})


# random weights change a lot per step, so the presets' adaptive schedule computes most steps there:
# the integration tests that need cached steps use a fixed interval
FIXED_TAYLORSEER = ditaccel.TaylorSeerConfig(interval=4, order=1, warmup_steps=3, final_steps=1)


def units_left(model) -> int:
    return sum(isinstance(m, UnitModule) for m in model.model.diffusion_model.modules())


def flux_caches(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    dm = m.model.diffusion_model
    mlps = BlockCounter([b.img_mlp for b in dm.double_blocks])
    pos, neg = tiny.flux_conditioning(1), tiny.flux_conditioning(2)
    lat = torch.zeros(1, 16, 8, 8)
    options_before = repr(m.model_options)
    base12 = tiny.ksample(m, pos, neg, lat, steps=12, cfg=2.0)
    base_mlp = mlps.take()
    base9 = tiny.ksample(m, pos, neg, lat, steps=9, cfg=2.0)  # about the work of the cached runs
    mlps.take()
    out = {"rel_err_base9_vs_base12": rel(base9, base12), "presets": {}}
    for preset in ("quality", "balanced", "fast"):
        patched = run_node("DitAccelerate", model=m, preset=preset, interval=0, warmup_steps=-1, final_steps=-1,
                           cache_scope="auto", verbose=True)
        acc = tiny.ksample(patched, pos, neg, lat, steps=12, cfg=2.0)
        st = last_stats(patched)
        out["presets"][preset] = {
            "same_configs_as_diffusers": list(spec_of(patched).configs) == resolve_configs(preset, {}),
            "methods": [c.method_name for c in spec_of(patched).configs],
            "rel_err": rel(acc, base12), "stats": st, "mlp_calls": mlps.take(), "units_in_tree": units_left(m),
        }
    # per-module units (the attention/MLP outputs), through the advanced TaylorSeer node
    module = run_method_node("DitAccelTaylorSeer", m, interval=4, granularity="module")
    acc = tiny.ksample(module, pos, neg, lat, steps=12, cfg=2.0)
    out["module"] = {"rel_err": rel(acc, base12), "stats": last_stats(module), "mlp_calls": mlps.take(),
                     "units_in_tree": units_left(m)}
    out["base_mlp_calls"] = base_mlp

    # reset across runs: 12 steps, 7 steps, then 12 again (same as the first and as a fresh node); the
    # node's interval input turns the preset's adaptive schedule into a fixed one
    bal = run_node("DitAccelerate", model=m, preset="balanced", interval=4, warmup_steps=3, final_steps=-1,
                   cache_scope="auto", verbose=False)
    first = tiny.ksample(bal, pos, neg, lat, steps=12, cfg=2.0)
    s12 = last_stats(bal)
    short = tiny.ksample(bal, pos, neg, lat, steps=7, cfg=2.0)
    s7 = last_stats(bal)
    again = tiny.ksample(bal, pos, neg, lat, steps=12, cfg=2.0)
    base7 = tiny.ksample(m, pos, neg, lat, steps=7, cfg=2.0)
    out["reset"] = {"stats12": s12, "stats7": s7, "rerun_identical": bool(torch.equal(first, again)),
                    "rel_err7": rel(short, base7)}

    # advanced nodes (inputs from the config dataclasses)
    ts_block = run_method_node("DitAccelTaylorSeer", m, interval=3, granularity="block")
    acc = tiny.ksample(ts_block, pos, neg, lat, steps=12, cfg=2.0)
    out["taylorseer_block"] = {"rel_err": rel(acc, base12), "stats": last_stats(ts_block)}
    delta = run_method_node("DitAccelDeltaCache", m, interval=2)
    acc = tiny.ksample(delta, pos, neg, lat, steps=12, cfg=2.0)
    out["delta_cache"] = {"rel_err": rel(acc, base12), "stats": last_stats(delta)}
    adaptive = accelerate_model(m, ditaccel.TaylorSeerConfig(interval=4, threshold=0.05, warmup_steps=2))
    acc = tiny.ksample(adaptive, pos, neg, lat, steps=12, cfg=2.0)
    out["taylorseer_adaptive"] = {"rel_err": rel(acc, base12), "stats": last_stats(adaptive)}
    model_scope = accelerate_model(m, FIXED_TAYLORSEER, scope="model")
    acc = tiny.ksample(model_scope, pos, neg, lat, steps=12, cfg=2.0)
    out["taylorseer_model_scope"] = {"rel_err": rel(acc, base12), "stats": last_stats(model_scope)}

    after = tiny.ksample(m, pos, neg, lat, steps=12, cfg=2.0)
    mlps.close()
    out["original_identical_after"] = bool(torch.equal(after, base12))
    out["original_options_unchanged"] = repr(m.model_options) == options_before
    out["original_has_spec"] = SPEC_KEY in m.model_options.get("transformer_options", {})
    out["units_in_tree_after_original"] = units_left(m)
    R["flux_caches"] = out


def wan_taylorseer(R: dict) -> None:
    m = tiny.tiny_wan(seed=0)
    pos, neg = tiny.wan_conditioning(1), tiny.wan_conditioning(2)
    lat = torch.zeros(1, 16, 3, 8, 8)
    base10 = tiny.ksample(m, pos, neg, lat, steps=10, cfg=3.0)
    patched = run_method_node("DitAccelTaylorSeer", m, interval=3, granularity="module")
    acc = tiny.ksample(patched, pos, neg, lat, steps=10, cfg=3.0)
    st = last_stats(patched)
    after = tiny.ksample(m, pos, neg, lat, steps=10, cfg=3.0)
    svg2 = run_method_node("DitAccelSVG2", m, q_clusters=4, k_clusters=8, kmeans_iters_first=3, block_size=16)
    lat_big = torch.zeros(1, 16, 3, 16, 16)
    big = tiny.ksample(m, pos, neg, lat_big, steps=6, cfg=3.0)
    sparse = tiny.ksample(svg2, pos, neg, lat_big, steps=6, cfg=3.0)
    R["wan"] = {"rel_err": rel(acc, base10), "stats": st, "original_identical_after": bool(torch.equal(after, base10)),
                "svg2_rel_err": rel(sparse, big), "svg2_stats": last_stats(svg2)}


def flux_sparse(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    pos, neg = tiny.flux_conditioning(1), tiny.flux_conditioning(2)
    lat = torch.zeros(1, 16, 24, 24)  # 144 image tokens + 16 text tokens
    base8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    out = {}
    for node_id, inputs in (("DitAccelCLEAR", {"radius": 3.0}),
                            ("DitAccelRettention", {"keep_fraction": 0.25}),
                            ("DitAccelSVG2", {"q_clusters": 6, "k_clusters": 12, "kmeans_iters_first": 3,
                                              "block_size": 16, "top_p": 0.7})):
        patched = run_method_node(node_id, m, **inputs)
        acc = tiny.ksample(patched, pos, neg, lat, steps=8, cfg=2.0)
        out[node_id] = {"rel_err": rel(acc, base8), "stats": last_stats(patched)}
    both = accelerate_model(m, [FIXED_TAYLORSEER, ditaccel.CLEARConfig(radius=3.0)])
    acc = tiny.ksample(both, pos, neg, lat, steps=8, cfg=2.0)
    out["taylorseer_plus_clear"] = {"rel_err": rel(acc, base8), "stats": last_stats(both)}
    after = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    out["original_identical_after"] = bool(torch.equal(after, base8))
    out["override_on_original"] = "optimized_attention_override" in m.model_options.get("transformer_options", {})
    R["flux_sparse"] = out


def errors(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    R["errors_ui"] = {
        "two_sparse": error_of(lambda: accelerate_model(m, [ditaccel.CLEARConfig(), ditaccel.SVG2Config()])),
        "two_caches": error_of(lambda: accelerate_model(m, [ditaccel.StepCacheConfig(), ditaccel.TaylorSeerConfig()])),
        "sparse_model_scope": error_of(lambda: run_method_node("DitAccelCLEAR", m, cache_scope="model")),
    }


def main(out_path: str, parts: list[str]) -> None:
    torch.manual_seed(0)
    R: dict = {"errors": {}}
    base.discovery(R)  # registers the nodes through ComfyUI's custom-node loader
    for name, fn in (("flux_caches", flux_caches), ("wan", wan_taylorseer), ("flux_sparse", flux_sparse),
                     ("errors_ui", errors)):
        if parts and name not in parts:
            continue
        try:
            fn(R)
        except Exception:  # noqa: BLE001
            R["errors"][name] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
