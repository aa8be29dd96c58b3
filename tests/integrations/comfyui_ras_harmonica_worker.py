"""HarmoniCa (router loader node) and RAS inside real ComfyUI; writes what it measured as JSON.

Started by tests/integrations/test_comfyui_ras_harmonica.py in its own process (see comfyui_worker.py
for why). Models are ComfyUI's own (tiny, random), nodes are called as ComfyUI's executor calls
them, sampling is ComfyUI's KSampler node; the HarmoniCa routers are built here with ditaccel's
Router class (as tests/methods/test_harmonica.py does) and saved to a file the loader node reads.

    python tests/integrations/comfyui_ras_harmonica_worker.py OUT.json [part ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfyui_worker as base  # noqa: E402  (puts ComfyUI on sys.path)

import ditaccel  # noqa: E402
from ditaccel.integrations.comfyui import tiny  # noqa: E402
from ditaccel.integrations.comfyui.runtime import (_CURRENT_RUN, RUN_KEY, ComfyEngine, accelerate_model,  # noqa: E402
                                                   last_stats, spec_of)
from ditaccel.methods.harmonica_router import Router  # noqa: E402

rel, run_node, node_defaults, BlockCounter = base.rel, base.run_node, base.node_defaults, base.BlockCounter
error_of = base.error_of
TMP = Path(tempfile.mkdtemp(prefix="ditaccel_comfy_routers_"))


def nodes_ui(R: dict) -> None:
    import nodes

    out = {}
    for node_id in ("DitAccelRAS", "DitAccelHarmoniCaLoader"):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        out[node_id] = {"experimental": bool(cls.EXPERIMENTAL), "inputs": sorted(cls.INPUT_TYPES()["required"])}
    R["nodes_ui"] = out


# -- HarmoniCa ------------------------------------------------------------------------------------------


def router_schedule(steps: int, groups: int) -> torch.Tensor:
    """Logits: steps 0-1 compute everything; later, group g is skipped at step s when (s + g) is even."""
    z = torch.full((steps, groups), 4.0)
    for s in range(2, steps):
        for g in range(groups):
            if (s + g) % 2 == 0:
                z[s, g] = -4.0
    return z


def save_router(name: str, logits, family: str, cls: str, num_blocks: int, groups) -> str:
    path = TMP / f"{name}.safetensors"
    Router(logits, family, cls, num_blocks, groups, 0.1).save(path)
    return str(path)


def harmonica(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    dm = m.model.diffusion_model
    blocks = list(dm.double_blocks) + list(dm.single_blocks)
    counter = BlockCounter(blocks)
    n = len(blocks)
    pos, neg = tiny.flux_conditioning(1), tiny.flux_conditioning(2)
    lat = torch.zeros(1, 16, 8, 8)
    options_before = repr(m.model_options)
    base8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    base_calls = counter.take()
    base6 = tiny.ksample(m, pos, neg, lat, steps=6, cfg=2.0)
    counter.take()

    z = router_schedule(8, n)
    groups = [(i, i + 1) for i in range(n)]
    path = save_router("flux", z, "flux", "Flux", n, groups)
    inputs = {**node_defaults("DitAccelHarmoniCaLoader"), "router_path": path}
    patched = run_node("DitAccelHarmoniCaLoader", model=m, **inputs)
    acc8 = tiny.ksample(patched, pos, neg, lat, steps=8, cfg=2.0)
    acc_calls = counter.take()
    st = last_stats(patched)
    fc = run_node("DitAccelHarmoniCaLoader", model=m, **{**inputs, "forecast": True})
    acc_fc = tiny.ksample(fc, pos, neg, lat, steps=8, cfg=2.0)
    counter.take()

    # a router written for the diffusers class of the same network (block groups inside ComfyUI's runs)
    diffusers_path = save_router("flux_diffusers", z, "flux", "FluxTransformer2DModel", n, groups)
    from_diffusers = accelerate_model(m, ditaccel.HarmoniCaConfig(router=diffusers_path))
    acc_diffusers = tiny.ksample(from_diffusers, pos, neg, lat, steps=8, cfg=2.0)

    # reset across runs with other step counts (interpolated router), then the first run again
    interp = run_node("DitAccelHarmoniCaLoader", model=m, **{**inputs, "interpolate_steps": True})
    first = tiny.ksample(interp, pos, neg, lat, steps=8, cfg=2.0)
    s8 = last_stats(interp)
    short = tiny.ksample(interp, pos, neg, lat, steps=5, cfg=2.0)
    s5 = last_stats(interp)
    again = tiny.ksample(interp, pos, neg, lat, steps=8, cfg=2.0)
    counter.take()

    crossing = save_router("crossing", torch.zeros(8, 2), "flux", "Flux", n, [(0, 3), (3, n)])
    errors = {
        "missing_file": error_of(lambda: run_node("DitAccelHarmoniCaLoader", model=m,
                                                  **{**inputs, "router_path": str(TMP / "missing.safetensors")})),
        "crossing_groups": error_of(lambda: accelerate_model(m, ditaccel.HarmoniCaConfig(router=crossing))),
        "model_scope": error_of(lambda: run_node("DitAccelHarmoniCaLoader", model=m,
                                                 **{**inputs, "cache_scope": "model"})),
        "other_step_count": error_of(lambda: tiny.ksample(patched, pos, neg, lat, steps=5, cfg=2.0)),
        "wan_router_on_flux": error_of(lambda: accelerate_model(m, ditaccel.HarmoniCaConfig(
            router=save_router("wan_cls", z, "wan", "WanModel", n, groups)))),
    }
    after = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    counter.close()
    R["harmonica"] = {
        "n_blocks": n, "base_block_calls": base_calls, "acc_block_calls": acc_calls, "stats8": st,
        "expected_cached": int((torch.sigmoid(z) <= 0.1)[1:].sum()),
        "rel_err": rel(acc8, base8), "rel_err_base6": rel(base6, base8), "rel_err_forecast": rel(acc_fc, base8),
        "forecast_stats": last_stats(fc),
        "diffusers_class_identical": bool(torch.equal(acc_diffusers, acc8)),
        "interp_first_identical": bool(torch.equal(first, acc8)),
        "stats_interp8": s8, "stats_interp5": s5, "rerun_identical": bool(torch.equal(first, again)),
        "errors": errors,
        "original_identical_after": bool(torch.equal(after, base8)),
        "original_options_unchanged": repr(m.model_options) == options_before,
    }

    # Chroma, with a router written for the diffusers class (ChromaTransformer2DModel)
    c = tiny.tiny_chroma(seed=0)
    cpos, cneg = tiny.chroma_conditioning(1), tiny.chroma_conditioning(2)
    cbase = tiny.ksample(c, cpos, cneg, lat, steps=8, cfg=2.0)
    cpath = save_router("chroma", z, "chroma", "ChromaTransformer2DModel", n, groups)
    cp = accelerate_model(c, ditaccel.HarmoniCaConfig(router=cpath))
    cacc = tiny.ksample(cp, cpos, cneg, lat, steps=8, cfg=2.0)
    cafter = tiny.ksample(c, cpos, cneg, lat, steps=8, cfg=2.0)
    R["harmonica_chroma"] = {"rel_err": rel(cacc, cbase), "stats": last_stats(cp),
                             "original_identical_after": bool(torch.equal(cafter, cbase))}

    # Wan: one run of blocks, a router for 6 steps over its 2 blocks
    w = tiny.tiny_wan(seed=0)
    wpos, wneg = tiny.wan_conditioning(1), tiny.wan_conditioning(2)
    wlat = torch.zeros(1, 16, 3, 8, 8)
    wbase = tiny.ksample(w, wpos, wneg, wlat, steps=6, cfg=3.0)
    nw = len(w.model.diffusion_model.blocks)
    wpath = save_router("wan", router_schedule(6, nw), "wan", "WanTransformer3DModel", nw,
                        [(i, i + 1) for i in range(nw)])
    wp = accelerate_model(w, ditaccel.HarmoniCaConfig(router=wpath))
    wacc = tiny.ksample(wp, wpos, wneg, wlat, steps=6, cfg=3.0)
    wafter = tiny.ksample(w, wpos, wneg, wlat, steps=6, cfg=3.0)
    R["harmonica_wan"] = {"rel_err": rel(wacc, wbase), "stats": last_stats(wp),
                          "original_identical_after": bool(torch.equal(wafter, wbase))}


# -- RAS ----------------------------------------------------------------------------------------------


class TokenCounter:
    """Token counts each block's hidden stream had when it ran (test instrumentation only)."""

    def __init__(self, blocks):
        self.seen: list[int] = []
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True) for b in blocks]

    def _hook(self, module, args, kwargs):
        img = kwargs.get("img", args[0] if args else None)
        self.seen.append(int(img.shape[1]))

    def take(self) -> list[int]:
        out, self.seen = self.seen, []
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def exactness(m, family: str) -> dict:
    """A sparse call on the same input as the recorded full call: RAS's output must be the full output
    (the K/V of inactive tokens come from the cache); without the cached K/V it must not be.
    Wan is called with one timestep per latent frame (Wan 2.2 style): its per-frame modulation is
    spread over the tokens and gathered with them."""
    dm = m.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    if family == "flux":
        x = torch.randn(1, 16, 16, 16, generator=g)
        ctx, y = torch.randn(1, 16, 64, generator=g), torch.randn(1, 32, generator=g)
        t = torch.tensor([0.7])
        extra = {"y": y, "guidance": torch.tensor([3.5])}
    elif family == "chroma":
        x = torch.randn(1, 16, 16, 16, generator=g)
        ctx = torch.randn(1, 16, 64, generator=g)
        t = torch.tensor([0.7])
        extra = {"guidance": torch.tensor([0.0])}
    else:
        x = torch.randn(1, 16, 2, 16, 16, generator=g)
        ctx = torch.randn(1, 16, 4096, generator=g)
        t = torch.tensor([[0.2, 0.7]])  # per frame
        extra = {}
    out = {}
    for drop_kv in (False, True):
        patched = accelerate_model(m, ditaccel.RASConfig(active_fraction=0.5, warmup_steps=1, reset_steps=()))
        engine = ComfyEngine(spec_of(patched), patched, torch.tensor([1.0, 0.6, 0.0]))
        to = dict(patched.model_options["transformer_options"])
        to[RUN_KEY] = engine
        to["cond_or_uncond"] = [0]
        results = []
        for sigma in (1.0, 0.6):  # step 0 (full, recorded), step 1 (sparse)
            to["sigmas"] = torch.tensor([sigma])
            named = {"x": x, "timestep": t, "context": ctx, **extra}
            call = engine.begin_call(x, to, ctx, named)
            if drop_kv and sigma < 1.0:
                engine.token_selection.router.caches.clear()
            token = _CURRENT_RUN.set(engine)
            try:
                with torch.no_grad():
                    res = dm(x, t, ctx, transformer_options=to, **extra)
            finally:
                _CURRENT_RUN.reset(token)
            results.append(engine.end_call(call, res))
        ras = engine.stats()["methods"]["RAS"]
        with torch.no_grad():
            plain = dm(x, t, ctx, transformer_options={}, **extra)
        out["without_kv" if drop_kv else "with_kv"] = {
            "rel_full_vs_plain": rel(results[0], plain), "rel_sparse_vs_full": rel(results[1], results[0]),
            "sparse_calls": ras["sparse_calls"], "missing_kv_cache": ras.get("missing_kv_cache", 0),
        }
    return out


def ras(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    dm = m.model.diffusion_model
    tokens = TokenCounter([dm.double_blocks[0], dm.single_blocks[0]])
    pos, neg = tiny.flux_conditioning(1), tiny.flux_conditioning(2)
    lat = torch.zeros(1, 16, 16, 16)  # 64 image tokens + 16 text tokens
    options_before = repr(m.model_options)
    base10 = tiny.ksample(m, pos, neg, lat, steps=10, cfg=2.0)
    base7 = tiny.ksample(m, pos, neg, lat, steps=7, cfg=2.0)
    base6 = tiny.ksample(m, pos, neg, lat, steps=6, cfg=2.0)
    tokens.take()

    patched = run_node("DitAccelRAS", model=m, **{**node_defaults("DitAccelRAS"), "active_fraction": 0.5,
                                                  "warmup_steps": 3})
    acc10 = tiny.ksample(patched, pos, neg, lat, steps=10, cfg=2.0)
    s10 = last_stats(patched)
    seen = tokens.take()
    short = tiny.ksample(patched, pos, neg, lat, steps=6, cfg=2.0)
    s6 = last_stats(patched)
    again = tiny.ksample(patched, pos, neg, lat, steps=10, cfg=2.0)
    quarter = accelerate_model(m, ditaccel.RASConfig(active_fraction=0.25, warmup_steps=3, reset_steps=()))
    acc_q = tiny.ksample(quarter, pos, neg, lat, steps=10, cfg=2.0)
    full = accelerate_model(m, ditaccel.RASConfig(active_fraction=1.0))
    acc_full = tiny.ksample(full, pos, neg, lat, steps=10, cfg=2.0)
    odd = accelerate_model(m, ditaccel.RASConfig(active_fraction=0.5, warmup_steps=1, reset_steps=()))
    lat_odd = torch.zeros(1, 16, 15, 16)
    odd_identical = bool(torch.equal(tiny.ksample(odd, pos, neg, lat_odd, steps=4, cfg=2.0),
                                     tiny.ksample(m, pos, neg, lat_odd, steps=4, cfg=2.0)))
    tokens.take()

    errors = {
        "with_taylorseer": error_of(lambda: accelerate_model(m, [ditaccel.RASConfig(), ditaccel.TaylorSeerConfig()])),
        "model_scope": error_of(lambda: run_node("DitAccelRAS", model=m, **{**node_defaults("DitAccelRAS"),
                                                                            "cache_scope": "model"})),
        "sd3": error_of(lambda: accelerate_model(tiny.tiny_sd3(seed=0), ditaccel.RASConfig())),
    }
    exact = exactness(m, "flux")
    after = tiny.ksample(m, pos, neg, lat, steps=10, cfg=2.0)
    tokens.close()
    R["ras"] = {
        "stats10": s10, "stats6": s6, "tokens_seen": seen,
        "rel_err": rel(acc10, base10), "rel_err_base7": rel(base7, base10), "rel_err_quarter": rel(acc_q, base10),
        "rerun_identical": bool(torch.equal(acc10, again)), "rel_err6": rel(short, base6),
        "fraction1_identical": bool(torch.equal(acc_full, base10)), "odd_identical": odd_identical,
        "errors": errors, "exact": exact,
        "original_identical_after": bool(torch.equal(after, base10)),
        "original_options_unchanged": repr(m.model_options) == options_before,
        "override_on_original": "optimized_attention_override" in m.model_options.get("transformer_options", {}),
    }

    w = tiny.tiny_wan(seed=0)
    wtokens = TokenCounter([w.model.diffusion_model.blocks[0]])
    wpos, wneg = tiny.wan_conditioning(1), tiny.wan_conditioning(2)
    wlat = torch.zeros(1, 16, 2, 16, 16)  # 128 image tokens
    wbase = tiny.ksample(w, wpos, wneg, wlat, steps=8, cfg=3.0)
    wbase6 = tiny.ksample(w, wpos, wneg, wlat, steps=6, cfg=3.0)
    wtokens.take()
    wp = accelerate_model(w, ditaccel.RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=()))
    wacc = tiny.ksample(wp, wpos, wneg, wlat, steps=8, cfg=3.0)
    wseen = wtokens.take()
    wafter = tiny.ksample(w, wpos, wneg, wlat, steps=8, cfg=3.0)
    wtokens.close()
    c = tiny.tiny_chroma(seed=0)
    cpos, cneg = tiny.chroma_conditioning(1), tiny.chroma_conditioning(2)
    cbase = tiny.ksample(c, cpos, cneg, lat, steps=8, cfg=2.0)
    cp = accelerate_model(c, ditaccel.RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=()))
    cacc = tiny.ksample(cp, cpos, cneg, lat, steps=8, cfg=2.0)
    cafter = tiny.ksample(c, cpos, cneg, lat, steps=8, cfg=2.0)
    R["ras_chroma"] = {"rel_err": rel(cacc, cbase), "stats": last_stats(cp), "exact": exactness(c, "chroma"),
                       "original_identical_after": bool(torch.equal(cafter, cbase))}

    R["ras_wan"] = {"rel_err": rel(wacc, wbase), "rel_err_base6": rel(wbase6, wbase), "stats": last_stats(wp),
                    "tokens_seen": wseen, "original_identical_after": bool(torch.equal(wafter, wbase)),
                    "exact": exactness(w, "wan")}


def main(out_path: str, parts: list[str]) -> None:
    torch.manual_seed(0)
    R: dict = {"errors": {}}
    base.discovery(R)  # registers the nodes through ComfyUI's custom-node loader
    for name, fn in (("nodes_ui", nodes_ui), ("harmonica", harmonica), ("ras", ras)):
        if parts and name not in parts:
            continue
        t = time.process_time()
        try:
            fn(R)
        except Exception:  # noqa: BLE001
            R["errors"][name] = traceback.format_exc()
        R.setdefault("cpu_s", {})[name] = round(time.process_time() - t, 2)
    Path(out_path).write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
