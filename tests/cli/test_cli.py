"""The ``ditaccel`` command line: help, info, bench end to end on a tiny model, bad options."""

import json
import resource
import subprocess
import sys
import time

import pytest

from ditaccel.cli.main import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ditaccel.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "info" in out


def test_console_script_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2
    assert "expected a command" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("flux", "FluxTransformer2DModel", "StepCache", "balanced", "triton", "CUDA", "torch", "diffusers"):
        assert word in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(f["family"] == "flux" for f in data["families"])
    assert any(m["method"] == "StepCache" and m["available"] for m in data["methods"])
    assert {"balanced", "off"} <= {p["preset"] for p in data["presets"]}


@pytest.mark.parametrize("args, expected", [
    (["--presets", "turbo"], "unknown preset 'turbo'"),
    (["--methods", "NoSuchMethod"], "unknown method 'NoSuchMethod'"),
    (["--methods", "StepCache:interval"], "expected key=value"),
    (["--methods", "StepCache:intervall=3"], "Did you mean 'interval'"),
    (["--methods", "StepCache:interval=0"], "interval must be >= 1"),
    (["--steps", "-3"], "an integer >= 1), got -3"),
    (["--steps", "abc"], "got 'abc'"),
    (["--repeats", "0"], "an integer >= 1), got 0"),
    (["--model", "no/such/model"], "neither a reference model"),
    (["--model", "tiny:nosuchfamily"], "no tiny random pipeline"),
])
def test_bad_bench_options_exit_2(capsys, args, expected):
    with pytest.raises(SystemExit) as exc:
        code = main(["bench", *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.timeout(600)
def test_bench_end_to_end_tiny(tmp_path):
    """< 60 s of CPU time (wall time too on an idle machine; the wall bound is loose for shared CI)."""
    from PIL import Image

    out = tmp_path / "out"
    cpu0 = _children_cpu_s()
    start = time.perf_counter()
    proc = run_cli("bench", "--model", "tiny:flux", "--steps", "4", "--repeats", "1",
                   "--methods", "StepCache:interval=2,warmup_steps=1,final_steps=0",
                   "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "b.md"), "--out", str(out))
    elapsed = time.perf_counter() - start
    cpu = _children_cpu_s() - cpu0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cpu < 60, f"bench took {cpu:.1f}s of CPU ({elapsed:.1f}s wall)"
    assert elapsed < 300, f"bench took {elapsed:.1f}s wall ({cpu:.1f}s CPU)"
    assert "random weights: fidelity not meaningful" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out / "results.json").read_text())["results"][0]["label"] == "full"
    labels = [r["label"] for r in data["results"]]
    assert labels[0] == "full" and any(l.startswith("StepCache") for l in labels)
    full, method = data["results"][0], data["results"][-1]
    assert full["identical_to_full"] is True and full["speedup"] == pytest.approx(1.0)
    assert method["status"] == "ok" and method["flops_skipped_fraction"] > 0
    assert method["psnr_image"] is not None and 0 < method["ssim_image"] <= 1
    assert len(method["wall_s"]) == 1 and method["cpu_median_s"] > 0
    for name in ("pareto.png", "grid.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as img:
            img.load()
            assert img.size[0] > 100 and img.size[1] > 100
    md = (tmp_path / "b.md").read_text()
    assert "ditaccel bench --model tiny:flux" in md and "| variant |" in md and "torch" in md


@pytest.mark.timeout(600)
def test_bench_compare_peers_runs_every_installed_peer(tmp_path):
    """--compare-peers adds diffusers' FirstBlockCache / TaylorSeerCache / MagCache and cache-dit's
    DBCache with and without its TaylorSeer calibrator to the same run; each runs (or, when its
    library is missing, is reported unavailable with the reason) and gets speed and fidelity."""
    proc = run_cli("bench", "--model", "tiny:flux", "--steps", "6", "--repeats", "1", "--presets", "off",
                   "--compare-peers", "--no-progress", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["label"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    peers = ["diffusers:FirstBlockCache", "diffusers:TaylorSeerCache", "diffusers:MagCache",
             "cache-dit:DBCache-F1B0", "cache-dit:DBCache-F1B0+TaylorSeer"]
    assert set(peers) <= set(rows), sorted(rows)
    try:
        import cache_dit  # noqa: F401
        installed = set(peers)
    except ImportError:
        installed = set(peers[:3])
    for label in peers:
        row = rows[label]
        if label not in installed:
            assert row["status"] == "unavailable" and "pip install cache-dit" in row["error"]
            continue
        assert row["status"] == "ok", (label, row.get("error"))
        assert row["cpu_median_s"] > 0 and 0 < row["ssim_image"] <= 1  # PSNR is null when identical (inf)
    if "cache-dit:DBCache-F1B0+TaylorSeer" in installed:  # its own configuration, not the plain one again
        assert "TaylorSeerCalibratorConfig" in rows["cache-dit:DBCache-F1B0+TaylorSeer"]["description"]
