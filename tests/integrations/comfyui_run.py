"""Runs a ComfyUI worker script (tests/integrations/comfyui*_worker.py) in its own process and
returns the JSON it wrote; fails the test with the worker's stderr when it crashed or reported errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_worker(script: str, folder: Path) -> dict:
    out = folder / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(HERE / script), str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"ComfyUI worker {script} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(out.read_text())
    assert not results["errors"], "\n\n".join(f"{k}:\n{v}" for k, v in results["errors"].items())
    return results
