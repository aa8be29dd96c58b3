"""Quantized (torchao int8 weight-only) and compiled (torch.compile) transformers, accelerated.

torchao: ``quantize_(transformer, Int8WeightOnlyConfig())`` swaps the Linear weights for int8
tensor subclasses; the hooks sit on blocks, so every caching method works unchanged. Fidelity is
measured against the un-accelerated quantized run.

torch.compile: the tests use ``backend="aot_eager"`` (dynamo tracing + AOTAutograd, no code
generation) because inductor's C++ compilation of even the tiny model takes minutes on this
2-core shared CPU; bench/compat_matrix.sh perf measures inductor once for the docs. Three ways
of compiling are covered:

- regional: ``block.compile()`` on every transformer block (diffusers' ``compile_repeated_blocks``
  does the same), before or after ``enable_acceleration``. Our block hooks are traced into each
  block's graph; a skipped step is a different guard set (one more graph per block position).
- in place: ``transformer.compile()``.
- wrapper: ``pipe.transformer = torch.compile(pipe.transformer)``; ``enable_acceleration``
  finds the original module inside the wrapper (``find_transformer`` unwraps it).

Graph breaks (documented in docs/compatibility.md): the step clock reads the timestep as a Python
float (``Tensor.item``), the caches check that cached tensors are finite before reusing them
(``bool(tensor)``), the FLOP profiler runs in the first call of each input shape. They are cheap
next to the blocks; ``fullgraph=True`` is not supported with ditaccel.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters  # dynamo's compile statistics (test-only use)

import ditaccel
from compat_helpers import TOLERANCE, caching_configs, method_name, rel_err, run, skipped
from helpers.tiny import tiny_pipeline

STEPS = 8
CONFIGS = caching_configs()


# ---------------------------------------------------------------------------------------------
# torchao


def _int8_weight_only():
    quantization = pytest.importorskip("torchao.quantization")
    if hasattr(quantization, "Int8WeightOnlyConfig"):
        return quantization.quantize_, quantization.Int8WeightOnlyConfig()
    if hasattr(quantization, "int8_weight_only"):  # torchao < 0.10
        return quantization.quantize_, quantization.int8_weight_only()
    pytest.skip("this torchao has no int8 weight-only config")


@pytest.fixture(scope="module")
def quantized():
    cache = {}

    def get(case):
        if case not in cache:
            quantize_, config = _int8_weight_only()
            pipe = tiny_pipeline(case)
            eager = run(pipe, case, steps=STEPS)
            quantize_(pipe.transformer, config)
            weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
            assert type(weight) is not torch.nn.Parameter or weight.dtype == torch.int8, type(weight)
            ref = run(pipe, case, steps=STEPS)
            assert 0 < rel_err(ref, eager) < 0.05, "int8 weights should change the output a little"
            cache[case] = (pipe, ref)
        return cache[case]

    return get


QUANT_CASES = [("flux", cid, c) for cid, c in CONFIGS] + [("sd3", "preset-balanced", "balanced")]


@pytest.mark.parametrize("case,cid,config", QUANT_CASES, ids=[f"{a}-{b}" for a, b, _ in QUANT_CASES])
def test_torchao_int8_weight_only(case, cid, config, quantized):
    pipe, ref = quantized(case)
    handle = ditaccel.enable_acceleration(pipe, config)
    assert handle.family == case
    acc = run(pipe, case, steps=STEPS)
    stats = handle.stats()
    handle.remove()
    assert skipped(stats) > 0 and stats["flops_skipped_fraction"] > 0
    assert torch.isfinite(acc).all()
    assert rel_err(acc, ref) < TOLERANCE[method_name(config)]
    assert torch.equal(run(pipe, case, steps=STEPS), ref), "not bit-identical after remove()"


# ---------------------------------------------------------------------------------------------
# torch.compile


def _blocks(transformer):
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def _compile(pipe, how: str):
    if how == "regional":
        for block in _blocks(pipe.transformer):
            block.compile(backend="aot_eager")
    elif how == "in-place":
        pipe.transformer.compile(backend="aot_eager")
    elif how == "wrapper":
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def eager_results():
    """Un-accelerated and accelerated eager outputs of tiny FLUX, per config."""
    pipe = tiny_pipeline("flux")
    out = {"none": run(pipe, "flux", steps=STEPS)}
    for cid, config in CONFIGS:
        with ditaccel.enable_acceleration(pipe, config):
            out[cid] = run(pipe, "flux", steps=STEPS)
    return out


COMPILE_CASES = [
    ("regional", "before", "preset-balanced"),
    ("regional", "after", "preset-fast"),
    ("wrapper", "before", "preset-balanced"),
] + [("in-place", "before", cid) for cid, _ in CONFIGS if not cid.startswith("preset")]


@pytest.mark.parametrize("how,order,cid", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
def test_torch_compile(how, order, cid, eager_results):
    """The compiled, accelerated run gives the eager accelerated output (same ops, traced), is
    within the method's tolerance of the compiled un-accelerated run, and remove() restores it."""
    config = dict(CONFIGS)[cid]
    torch.compiler.reset()
    pipe = tiny_pipeline("flux")
    if order == "before":
        _compile(pipe, how)
        ref = run(pipe, "flux", steps=STEPS)
        handle = ditaccel.enable_acceleration(pipe, config)
    else:
        handle = ditaccel.enable_acceleration(pipe, config)
        _compile(pipe, how)
        ref = None
    assert handle.family == "flux"
    counters.clear()
    acc = run(pipe, "flux", steps=STEPS)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    again = run(pipe, "flux", steps=STEPS)  # compiled code reused: same result
    stats = handle.stats()
    handle.remove()
    after = run(pipe, "flux", steps=STEPS)
    ref = after if ref is None else ref
    assert skipped(stats) > 0 and stats["generations"] == 2
    assert torch.isfinite(acc).all() and torch.equal(acc, again)
    assert rel_err(acc, eager_results[cid]) < 1e-5
    assert rel_err(ref, eager_results["none"]) < 1e-5
    assert rel_err(acc, ref) < TOLERANCE[method_name(config)]
    assert torch.equal(after, ref), "not bit-identical after remove()"
    torch.compiler.reset()
