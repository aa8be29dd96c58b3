"""Segment residual caching on a toy transformer whose loop adds control residuals between blocks."""

import torch
from torch import nn

import ditaccel


class ShiftBlock(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(float(shift)))

    def forward(self, hidden_states, temb=None):
        return hidden_states + self.shift


class ToyTransformer(nn.Module):
    """Blocks add a constant; the loop adds a per-step 'ControlNet' residual after each block."""

    def __init__(self, n=4):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(ShiftBlock(i + 1) for i in range(n))

    def forward(self, hidden_states, timestep, control=None):
        h = hidden_states
        for i, block in enumerate(self.transformer_blocks):
            h = block(h)
            if control is not None:
                h = h + control[i]
        return h


def _run(model, steps, handle=None):
    x = torch.zeros(1, 3, 2)
    outs = []
    for s in range(steps):
        control = [torch.full((1, 3, 2), 10.0 * (s + 1) * (i + 1)) for i in range(4)]
        outs.append(model(x, timestep=torch.tensor([1.0 - s / steps]), control=control))
    return outs


def test_loop_additions_are_not_cached_twice():
    model = ToyTransformer()
    with torch.no_grad():
        ref = _run(model, 6)
        with ditaccel.enable_acceleration(model, ditaccel.StepCacheConfig(interval=2, warmup_steps=1, final_steps=0)) as h:
            h.set_num_steps(6)
            out = _run(model, 6)
            cached = h.stats()["methods"]["StepCache"]["cached"]
    assert cached > 0
    # The blocks' own work is step-independent here, so reusing it is exact; the control
    # residuals of the current step must be applied once, not once more from the cached step.
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b)


def test_cached_residual_reused_matches_identity_range():
    model = ToyTransformer()
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.shift.zero_()
        ref = _run(model, 5)
        with ditaccel.enable_acceleration(model, ditaccel.StepCacheConfig(interval=3, warmup_steps=0, final_steps=0)):
            out = _run(model, 5)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
