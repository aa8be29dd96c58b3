"""Runs ditaccel's ComfyUI nodes inside real ComfyUI code and writes what it measured as JSON.

Started by tests/integrations/test_comfyui.py in its own process: ComfyUI's core is put on
sys.path (with the torchvision it needs, see ditaccel.integrations.comfyui.vendored) only there,
so the pytest process and the other tests keep their own environment. Nothing here is mocked:
the node is discovered by ComfyUI's ``nodes.load_custom_node``, run through the same calling
convention as ComfyUI's executor, models are loaded by ComfyUI's loading code and sampled with
ComfyUI's KSampler node.

    python tests/integrations/comfyui_worker.py OUT.json
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ditaccel.integrations.comfyui import use_vendored_comfyui

use_vendored_comfyui()

import nodes  # noqa: E402  (ComfyUI's nodes module)
from comfy_api.internal import make_locked_method_func  # noqa: E402

import ditaccel  # noqa: E402
from ditaccel.integrations.comfyui import tiny  # noqa: E402
from ditaccel.integrations.comfyui.runtime import SPEC_KEY, last_stats  # noqa: E402
from ditaccel.methods.step_cache import is_compute_step  # noqa: E402

# The tiny models gain nothing from threads, and on a shared CPU box extra threads only contend
# (the pytest process does the same in tests/conftest.py); every worker imports this module.
torch.set_num_threads(1)

TEMPLATE = Path(ditaccel.__file__).parent / "integrations" / "comfyui" / "custom_node" / "__init__.py"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def node_defaults(node_id: str) -> dict:
    """Every widget input of a node at its default (what a freshly placed node holds)."""
    required = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    out = {}
    for name, decl in required.items():
        if name != "model":
            opts = decl[1] if len(decl) > 1 else {}
            out[name] = opts.get("default", decl[0][0] if isinstance(decl[0], list) else None)
    return out


def run_node(node_id: str, **inputs):
    """Call a node the way ComfyUI's executor does (execution._async_map_node_over_list)."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    cls.VALIDATE_CLASS()
    clone = cls.PREPARE_CLASS_CLONE({})
    f = make_locked_method_func(cls, cls.FUNCTION, clone)
    return f(**inputs).result[0]


def error_of(fn) -> dict:
    """What calling ``fn`` raised (type and message), for the parent test to assert on."""
    try:
        fn()
        return {"raised": False}
    except Exception as err:  # noqa: BLE001
        return {"raised": True, "type": type(err).__name__, "message": str(err)}


class BlockCounter:
    """Counts real executions of the DiT blocks (forward pre-hooks, test instrumentation only)."""

    def __init__(self, blocks):
        self.calls = 0
        self.handles = [b.register_forward_pre_hook(self._hook) for b in blocks]

    def _hook(self, module, args):
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n

    def close(self):
        for h in self.handles:
            h.remove()


def expected_schedule(total: int, interval: int, warmup: int, final: int) -> list[bool]:
    return [is_compute_step(s, total, interval, warmup, final) for s in range(total)]


def discovery(R: dict) -> None:
    root = Path(tempfile.mkdtemp(prefix="comfy_custom_nodes_"))
    try:
        pkg = root / "ditaccel_nodes"
        pkg.mkdir()
        shutil.copy(TEMPLATE, pkg / "__init__.py")
        loaded = asyncio.run(nodes.load_custom_node(str(pkg)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("DitAccel"))
    step_inputs = nodes.NODE_CLASS_MAPPINGS["DitAccelStepCache"].INPUT_TYPES()["required"]
    main_inputs = nodes.NODE_CLASS_MAPPINGS["DitAccelerate"].INPUT_TYPES()["required"]
    R["discovery"] = {
        "loaded": bool(loaded),
        "node_ids": ids,
        "display": {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in ids},
        "step_cache_interval": step_inputs["interval"][1],
        "step_cache_inputs": sorted(step_inputs),
        "main_inputs": sorted(main_inputs),
        "main_presets": main_inputs["preset"][0] if isinstance(main_inputs["preset"][0], list) else main_inputs["preset"][1].get("options"),
    }


def flux(R: dict) -> None:
    m = tiny.tiny_flux(seed=0)
    dm = m.model.diffusion_model
    counter = BlockCounter(list(dm.double_blocks) + list(dm.single_blocks))
    n_blocks = len(dm.double_blocks) + len(dm.single_blocks)
    pos, neg = tiny.flux_conditioning(1), tiny.flux_conditioning(2)
    lat = torch.zeros(1, 16, 8, 8)
    options_before = repr(m.model_options)

    t = time.perf_counter()
    base8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    base_time = time.perf_counter() - t
    base_calls = counter.take()

    # the step cache (the DiT Accelerate presets are TaylorSeer: tests/integrations/test_comfyui_methods.py)
    patched = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=2, final_steps=1, cache_scope="auto")
    t = time.perf_counter()
    acc8 = tiny.ksample(patched, pos, neg, lat, steps=8, cfg=2.0)
    acc_time = time.perf_counter() - t
    acc_calls = counter.take()
    stats8 = last_stats(patched)

    again8 = tiny.ksample(m, pos, neg, lat, steps=8, cfg=2.0)
    counter.take()
    off = run_node("DitAccelerate", model=m, preset="off", interval=0, warmup_steps=-1, final_steps=-1,
                   cache_scope="auto", verbose=False)
    off8 = tiny.ksample(off, pos, neg, lat, steps=8, cfg=2.0)
    counter.take()
    base6 = tiny.ksample(m, pos, neg, lat, steps=6, cfg=2.0)  # same block work as the cached 8-step run
    counter.take()

    # per-run reset: other step counts, another resolution and batch size, then a fresh node for comparison
    acc5 = tiny.ksample(patched, pos, neg, lat, steps=5, cfg=2.0)
    stats5 = last_stats(patched)
    lat_b2 = torch.zeros(2, 16, 12, 8)
    acc9_b2 = tiny.ksample(patched, pos, neg, lat_b2, steps=9, cfg=2.0)
    stats9 = last_stats(patched)
    acc5_again = tiny.ksample(patched, pos, neg, lat, steps=5, cfg=2.0)
    fresh = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=2, final_steps=1, cache_scope="auto")
    fresh5 = tiny.ksample(fresh, pos, neg, lat, steps=5, cfg=2.0)
    base9_b2 = tiny.ksample(m, pos, neg, lat_b2, steps=9, cfg=2.0)
    counter.take()

    # cfg 1: ComfyUI runs the cond branch only
    acc_cfg1 = tiny.ksample(patched, pos, neg, lat, steps=6, cfg=1.0)
    stats_cfg1 = last_stats(patched)
    base_cfg1 = tiny.ksample(m, pos, neg, lat, steps=6, cfg=1.0)

    # whole-model scope through the advanced node (inputs generated from StepCacheConfig)
    model_scope = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=2, final_steps=1, cache_scope="model")
    counter.take()
    acc_model = tiny.ksample(model_scope, pos, neg, lat, steps=8, cfg=2.0)
    model_scope_calls = counter.take()
    stats_model = last_stats(model_scope)
    counter.close()

    R["flux"] = {
        "n_blocks": n_blocks,
        "base_block_calls": base_calls,
        "acc_block_calls": acc_calls,
        "base_time_s": base_time,
        "acc_time_s": acc_time,
        "stats8": stats8,
        "expected8": expected_schedule(8, 2, 2, 1),
        "rel_err_acc8": rel(acc8, base8),
        "rel_err_base6_vs_base8": rel(base6, base8),
        "rel_err_off": rel(off8, base8),
        "off_identical": bool(torch.equal(off8, base8)),
        "original_identical_after": bool(torch.equal(again8, base8)),
        "original_options_unchanged": repr(m.model_options) == options_before,
        "original_has_spec": SPEC_KEY in m.model_options.get("transformer_options", {}),
        "patched_is_clone": patched is not m and patched.model is m.model,
        "stats5": stats5,
        "expected5": expected_schedule(5, 2, 2, 1),
        "stats9": stats9,
        "expected9": expected_schedule(9, 2, 2, 1),
        "acc9_b2_shape": list(acc9_b2.shape),
        "rel_err_acc9_b2": rel(acc9_b2, base9_b2),
        "rerun_identical": bool(torch.equal(acc5, acc5_again)),
        "fresh_identical": bool(torch.equal(acc5, fresh5)),
        "history_len": len(patched.model_options["transformer_options"][SPEC_KEY].history),
        "stats_cfg1": stats_cfg1,
        "rel_err_cfg1": rel(acc_cfg1, base_cfg1),
        "stats_model_scope": stats_model,
        "model_scope_block_calls": model_scope_calls,
        "rel_err_model_scope": rel(acc_model, base8),
    }


def wan(R: dict) -> None:
    m = tiny.tiny_wan(seed=0)
    dm = m.model.diffusion_model
    counter = BlockCounter(list(dm.blocks))
    pos, neg = tiny.wan_conditioning(1), tiny.wan_conditioning(2)
    lat = torch.zeros(1, 16, 3, 8, 8)
    base = tiny.ksample(m, pos, neg, lat, steps=6, cfg=3.0)
    base_calls = counter.take()
    patched = run_node("DitAccelStepCache", model=m, interval=2, warmup_steps=1, final_steps=1, cache_scope="auto")
    acc = tiny.ksample(patched, pos, neg, lat, steps=6, cfg=3.0)
    acc_calls = counter.take()
    again = tiny.ksample(m, pos, neg, lat, steps=6, cfg=3.0)
    base4 = tiny.ksample(m, pos, neg, lat, steps=4, cfg=3.0)
    counter.close()
    R["wan"] = {
        "model_base": type(m.model).__name__,
        "diffusion_model": type(dm).__name__,
        "n_blocks": len(dm.blocks),
        "base_block_calls": base_calls,
        "acc_block_calls": acc_calls,
        "stats": last_stats(patched),
        "expected": expected_schedule(6, 2, 1, 1),
        "rel_err": rel(acc, base),
        "rel_err_base4_vs_base6": rel(base4, base),
        "original_identical_after": bool(torch.equal(again, base)),
    }


def unsupported(R: dict) -> None:
    """A real ComfyUI MODEL of a family ditaccel does not support (AuraFlow, tiny, never sampled)."""
    import comfy.model_detection

    cfg = {"cond_seq_dim": 2048, "dim": 64, "n_layers": 2, "n_double_layers": 1, "n_heads": 2,
           "global_conddim": 64, "max_seq": 64, "patch_size": 2, "in_channels": 4, "out_channels": 4}
    model_config = comfy.model_detection.model_config_from_unet_config(cfg)
    import comfy.model_patcher

    model = comfy.model_patcher.ModelPatcher(model_config.get_model({}), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    try:
        run_node("DitAccelerate", model=model, preset="balanced", interval=0, warmup_steps=-1, final_steps=-1,
                 cache_scope="auto", verbose=False)
        R["unsupported"] = {"raised": False}
    except Exception as err:  # noqa: BLE001
        R["unsupported"] = {"raised": True, "type": type(err).__name__, "message": str(err),
                            "model_base": type(model.model).__name__}
    try:
        run_node("DitAccelRAS", model=tiny.tiny_flux(seed=0), **{**node_defaults("DitAccelRAS"), "cache_scope": "model"})
        R["unsupported_method"] = {"raised": False}
    except Exception as err:  # noqa: BLE001
        R["unsupported_method"] = {"raised": True, "type": type(err).__name__, "message": str(err)}
    try:
        run_node("DitAccelHarmoniCaLoader", model=tiny.tiny_flux(seed=0), router_path=__file__, threshold=0.1,
                 forecast=False, cache_scope="auto")
        R["harmonica"] = {"raised": False}
    except Exception as err:  # noqa: BLE001
        R["harmonica"] = {"raised": True, "type": type(err).__name__, "message": str(err)}


def families(R: dict) -> None:
    """The family table against the real ComfyUI classes: detection by class and block-patch support."""
    import importlib

    from ditaccel.integrations.comfyui.families import (FAMILIES, forward_reads_block_patches,
                                                         runs_diffusion_model_wrappers)

    out = {}
    for fam in FAMILIES.values():
        module, name = fam.classes[0]
        cls = getattr(importlib.import_module(module), name)
        dm = object.__new__(cls)
        out[fam.name] = {"class": f"{module}.{name}", "block_patches": forward_reads_block_patches(dm, fam),
                           "diffusion_model_wrappers": runs_diffusion_model_wrappers(dm),
                         "has_groups": bool(fam.groups)}
    sd3 = importlib.import_module("comfy.ldm.modules.diffusionmodules.mmdit").OpenAISignatureMMDITWrapper
    out["sd3_wrapper_mro_match"] = any((c.__module__, c.__name__) in FAMILIES["sd3"].classes for c in sd3.__mro__)
    vace = importlib.import_module("comfy.ldm.wan.model").VaceWanModel
    out["wan_vace_mro_match"] = any((c.__module__, c.__name__) in FAMILIES["wan"].classes for c in vace.__mro__)
    R["families"] = out


def workflow(R: dict) -> None:
    """docs/comfyui_example_workflow.json against the real node definitions (class types, input names,
    choice values); model files are not checked."""
    import os

    root = Path(nodes.__file__).resolve().parent
    for extra in ("nodes_flux.py", "nodes_sd3.py"):
        asyncio.run(nodes.load_custom_node(str(root / "comfy_extras" / extra), module_parent="comfy_extras"))
    wf = json.loads((Path(__file__).resolve().parents[2] / "docs" / "comfyui_example_workflow.json").read_text())
    problems = []
    for node_id, node in wf.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            problems.append(f"{node_id}: unknown class_type {node['class_type']}")
            continue
        spec = cls.INPUT_TYPES()
        required, optional = spec.get("required", {}), spec.get("optional", {})
        given = set(node["inputs"])
        missing = set(required) - given
        unknown = given - set(required) - set(optional)
        if missing or unknown:
            problems.append(f"{node_id} {node['class_type']}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        for name, value in node["inputs"].items():
            decl = required.get(name) or optional.get(name)
            if decl and isinstance(decl[0], list) and not isinstance(value, list) and not str(value).endswith(
                    ".safetensors") and value not in decl[0]:
                problems.append(f"{node_id} {node['class_type']}.{name}: {value!r} not in {decl[0][:8]}")
    R["workflow"] = {"nodes": len(wf), "problems": problems, "cwd": os.getcwd()}


def main(out_path: str, parts: list[str]) -> None:
    torch.manual_seed(0)
    R: dict = {"comfyui_version": None, "errors": {}}
    try:
        import comfyui_version

        R["comfyui_version"] = comfyui_version.__version__
    except ImportError:
        pass
    for name, fn in (("discovery", discovery), ("workflow", workflow), ("families", families), ("flux", flux),
                     ("wan", wan), ("unsupported", unsupported)):
        if parts and name not in parts:
            continue
        try:
            fn(R)
        except Exception:  # noqa: BLE001
            R["errors"][name] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
