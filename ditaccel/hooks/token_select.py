"""Running only some image tokens through runs of transformer blocks (token selection).

A ``TokenSelector`` hooks the blocks of each token region of a model (``adapters/tokens.py``).
On a sparse call, the hook of a region's first block gathers the active image tokens of the
hidden stream (per sample: ``index`` is (B, n)) and, at every block of the region, the per-token
block arguments (rotary embeddings, masks, per-token modulation) with the index of the sequence
they cover; text tokens are always kept. The hook of the region's last block scatters the
output back onto the full sequence, filling inactive positions with that region's output from the
last call that computed them, so the model's own code after the blocks (final norm, projection,
unpatchify) runs on the full grid. Attention layers inside a region are told the current region
(``selector.current``) so a router can join the cached keys/values of inactive tokens.

Why gather at the blocks rather than at the model input: the patch embedding, learned position
embeddings (SD3 adds them before the blocks), rotary tables (computed by the model from the full
grid) and the unpatchify all assume the full grid; doing the cut inside keeps them unchanged, and
for packed inputs (FLUX) the first block's input is already one row per token, so gathering there
is the same as gathering at the model input, without having to rebuild ``img_ids``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..adapters.base import modulelist
from ..adapters.tokens import (
    HIDDEN, HIDDEN_IMAGE, HIDDEN_TEXT_IMAGE_PAD, IMAGE, JOINT, TEXT_FIRST, PerTokenArg, TokenFacts, TokenRegion,
)
from .attach import attach_hook, detach_hook

OFF = "off"  # hooks pass through (nothing recorded): bit-identical to the plain model
RECORD = "record"  # full computation, recording what later sparse calls need
SPARSE = "sparse"  # only the active image tokens go through the regions


# ---------------------------------------------------------------------------------------------
# index helpers


def keep_index(active: torch.Tensor, offset: torch.Tensor | int, length: int) -> torch.Tensor:
    """Positions kept in a sequence of ``length`` whose image tokens start at ``offset`` (per row).

    ``active`` (B, N) bool marks the active image tokens (same count in every row); every other
    position (text, padding) is kept. Returns (B, L_kept) ascending positions.
    """
    b, n_img = active.shape
    device = active.device
    if isinstance(offset, int):
        offset = torch.full((b,), offset, dtype=torch.long, device=device)
    full = torch.ones(b, length, dtype=torch.bool, device=device)
    pos = offset.to(device=device, dtype=torch.long)[:, None] + torch.arange(n_img, device=device)[None]
    full.scatter_(1, pos, active)
    kept = length - n_img + int(active[0].sum().item())
    order = torch.sort((~full).to(torch.int8), dim=1, stable=True).indices
    return order[:, :kept]


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows ``index`` (B, L) of ``x`` along ``dim``; ``x``'s dim 0 is the batch (B, or 1 to broadcast)."""
    b = index.shape[0]
    index = index.to(x.device)
    if b == 1:
        return x[:1].index_select(dim, index[0])
    # index_select per sample: much cheaper than advanced indexing on CPU for the small batches here
    return torch.stack([x[i if x.shape[0] == b else 0].index_select(dim - 1, index[i]) for i in range(b)])


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (B, L_kept, ...) at rows ``index`` of ``full`` (B, L, ...) in place; returns ``full``."""
    index = index.to(full.device)
    values = values.to(full.dtype)
    for i in range(index.shape[0]):
        full[i].index_copy_(0, index[i], values[i])
    return full


def _shared(index: torch.Tensor) -> bool:
    return index.shape[0] == 1 or bool((index == index[:1]).all())


_PARAMS: dict[type, list[str]] = {}


def as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name (positional ones named from the forward signature), or None."""
    if not args:
        return dict(kwargs)
    cls = type(module)
    names = _PARAMS.get(cls)
    if names is None:
        names = []
        for p in list(inspect.signature(cls.forward).parameters.values())[1:]:
            if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
                names = None
                break
            if p.kind == p.POSITIONAL_OR_KEYWORD:
                names.append(p.name)
        _PARAMS[cls] = names
    if names is None or len(args) > len(names):
        return None
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# regions


@dataclass
class RegionRuntime:
    """One token region of one model: its blocks, attention modules, and per-call indices."""

    region: TokenRegion
    blocks: list[tuple[str, nn.Module]]
    attention: list[tuple[str, nn.Module]]
    joint_order: str
    # per call
    sparse: bool = False
    recording: bool = False
    entered: bool = False
    batch: int = 0
    image_tokens: int = 0
    text_tokens: int = 0
    hidden_length: int = 0
    image_index: torch.Tensor | None = None
    hidden_index: torch.Tensor | None = None
    joint_index: torch.Tensor | None = None
    shared: bool = True
    split_needed: bool = False
    memo: dict = field(default_factory=dict)
    # kept across calls, per CFG branch: the region's output hidden stream (fills inactive rows)
    exit_cache: dict = field(default_factory=dict)

    @property
    def block_modules(self) -> list[nn.Module]:
        return [m for _, m in self.blocks]

    def clear_call(self) -> None:
        self.sparse = self.recording = self.entered = False
        self.image_index = self.hidden_index = self.joint_index = None
        self.split_needed = False
        self.memo.clear()

    def full_length(self) -> int:
        """Sequence length of the region's attention (for FLOP estimates)."""
        if self.region.hidden_layout == HIDDEN_TEXT_IMAGE_PAD:
            return self.hidden_length
        return self.image_tokens + self.text_tokens

    def kept_length(self) -> int:
        n = self.image_index.shape[1] if self.image_index is not None else self.image_tokens
        return self.full_length() - self.image_tokens + n

    def index_for(self, space: str) -> torch.Tensor:
        return {IMAGE: self.image_index, HIDDEN: self.hidden_index, JOINT: self.joint_index}[space]

    def attention_index(self, length: int) -> tuple[torch.Tensor, int] | None:
        """(keep index, full length) of an attention sequence of ``length`` kept positions."""
        if self.image_index is None:
            return None
        if length == self.image_index.shape[1]:
            return self.image_index, self.image_tokens
        if self.joint_index is not None and length == self.joint_index.shape[1]:
            return self.joint_index, self.image_tokens + self.text_tokens
        if (self.region.hidden_layout == HIDDEN_TEXT_IMAGE_PAD and self.hidden_index is not None
                and length == self.hidden_index.shape[1]):
            return self.hidden_index, self.hidden_length
        return None

    def gather_arg(self, spec: PerTokenArg, value):
        if value is None:
            return None
        if isinstance(value, (tuple, list)):
            return type(value)(self.gather_arg(spec, v) for v in value)
        if not isinstance(value, torch.Tensor) or value.ndim < spec.min_ndim:
            return value
        index = self.index_for(spec.space)
        if spec.batched:
            return gather_tokens(value, index, spec.seq_dim)
        if self.shared:
            return value.index_select(spec.seq_dim, index[0].to(value.device))
        # no batch dim: stack per-sample gathers (the attention modules then run per sample)
        return torch.stack([value.index_select(spec.seq_dim, index[b].to(value.device))
                            for b in range(index.shape[0])])


class TokenSelector:
    """Gather/scatter hooks on the token regions of ``model``, driven per call by a method."""

    def __init__(self, model: nn.Module, facts: TokenFacts, hook_name: str):
        self.model = model
        self.facts = facts
        self.hook_name = hook_name
        self.regions: list[RegionRuntime] = []
        for region in facts.regions:
            blocks = [(f"{path}.{i}", m) for path in region.blocks for i, m in enumerate(modulelist(model, path))]
            if not blocks:
                continue
            attention = []
            for name, block in blocks:
                for sub, module in block.named_modules():
                    if hasattr(module, "processor") and hasattr(module, "set_processor"):
                        attention.append((f"{name}.{sub}" if sub else name, module))
            self.regions.append(RegionRuntime(region, blocks, attention, facts.joint_order))
        self.mode = OFF
        self.branch = 0
        self.active: torch.Tensor | None = None  # (B, N) bool
        self.index: torch.Tensor | None = None  # (B, n) ascending
        self.current: RegionRuntime | None = None
        self.sample: int | None = None  # set while an attention module runs for one sample
        self.failed: str | None = None  # why a planned sparse call ran in full
        self._hooked: list[nn.Module] = []

    # -- install ---------------------------------------------------------------------------------
    def install(self) -> None:
        try:
            for region in self.regions:
                last = len(region.blocks) - 1
                for i, (_, block) in enumerate(region.blocks):
                    attach_hook(block, _RegionBlockHook(self, region, i == 0, i == last), self.hook_name)
                    self._hooked.append(block)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for block in self._hooked:
            detach_hook(block, self.hook_name)
        self._hooked = []
        self.reset()

    def reset(self) -> None:
        for region in self.regions:
            region.exit_cache.clear()
            region.clear_call()
        self.mode = OFF
        self.current = None

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for r in self.regions for t in r.exit_cache.values())

    # -- per call --------------------------------------------------------------------------------
    def begin(self, mode: str, branch: int, index: torch.Tensor | None = None, image_tokens: int = 0) -> None:
        """Start a call. ``index`` (B, n): ascending active image tokens of each sample (SPARSE)."""
        self.mode = mode
        self.branch = branch
        self.index = index
        self.active = None
        if index is not None:
            self.active = torch.zeros(index.shape[0], image_tokens, dtype=torch.bool, device=index.device)
            self.active.scatter_(1, index, True)
        self.current = None
        self.failed = None
        for region in self.regions:
            region.clear_call()

    def end(self) -> None:
        self.current = None
        self.mode = OFF

    @property
    def regions_entered(self) -> int:
        return sum(r.entered for r in self.regions)

    # -- called by the block hooks ---------------------------------------------------------------
    def enter(self, region: RegionRuntime, kwargs: dict) -> None:
        region.entered = True
        self.current = region
        spec = region.region
        hidden = kwargs.get(spec.hidden_arg)
        if not isinstance(hidden, torch.Tensor):
            self.failed = f"no tensor {spec.hidden_arg!r} at {region.blocks[0][0]}"
            return
        encoder = kwargs.get(spec.encoder_arg) if spec.encoder_arg else None
        region.batch = hidden.shape[0]
        region.text_tokens = int(encoder.shape[1]) if isinstance(encoder, torch.Tensor) else 0
        region.hidden_length = int(hidden.shape[1])
        if self.mode == RECORD:
            region.recording = True
            return
        if self.mode != SPARSE:
            return
        active = self.active
        n_img = active.shape[1]
        region.image_tokens = n_img
        if active.shape[0] != hidden.shape[0]:
            self.failed = f"batch {hidden.shape[0]} at {region.blocks[0][0]} != {active.shape[0]}"
            return
        if spec.hidden_layout == HIDDEN_IMAGE:
            if hidden.shape[1] != n_img:
                self.failed = f"{hidden.shape[1]} hidden tokens at {region.blocks[0][0]}, expected {n_img} image tokens"
                return
            offset = 0
        else:
            mask = kwargs.get(spec.mask_arg) if spec.mask_arg else None
            if isinstance(mask, torch.Tensor):
                offset = mask.to(torch.long).sum(dim=1) - n_img
            else:
                offset = hidden.shape[1] - n_img
            if hidden.shape[1] < n_img or (isinstance(offset, torch.Tensor) and bool((offset < 0).any())):
                self.failed = f"hidden stream at {region.blocks[0][0]} does not hold {n_img} image tokens"
                return
        region.image_index = self.index
        region.hidden_index = (self.index if spec.hidden_layout == HIDDEN_IMAGE
                               else keep_index(active, offset, region.hidden_length))
        if spec.encoder_arg and region.text_tokens:
            t = region.text_tokens
            region.joint_index = keep_index(active, t if region.joint_order == TEXT_FIRST else 0, t + n_img)
        region.shared = _shared(self.index)
        region.split_needed = not region.shared and any(not a.batched for a in spec.per_token)
        region.sparse = True

    def gather_block_args(self, region: RegionRuntime, kwargs: dict, first: bool) -> dict:
        spec = region.region
        out = dict(kwargs)
        if first:
            out[spec.hidden_arg] = gather_tokens(kwargs[spec.hidden_arg], region.hidden_index, 1)
        for arg in spec.per_token:
            value = kwargs.get(arg.name)
            if value is None:
                continue
            key = (arg.name, id(value))
            if key not in region.memo:
                region.memo[key] = (value, region.gather_arg(arg, value))  # keep value alive: ids stay unique
            out[arg.name] = region.memo[key][1]
        return out

    def exit(self, region: RegionRuntime, output):
        spec = region.region
        outputs = spec.outputs
        if len(outputs) == 1:
            hidden = output
        else:
            hidden = output[outputs.index("hidden")]
        if region.sparse:
            cache = region.exit_cache.get(self.branch)
            shape = (region.batch, region.hidden_length, hidden.shape[-1])
            if cache is None or tuple(cache.shape) != shape or cache.dtype != hidden.dtype:
                cache = hidden.new_zeros(shape)
            full = scatter_tokens(cache, region.hidden_index, hidden)
            region.exit_cache[self.branch] = full
            hidden = full
        elif region.recording:
            region.exit_cache[self.branch] = hidden
        self.current = None
        if len(outputs) == 1:
            return hidden
        return tuple(hidden if name == "hidden" else value for name, value in zip(outputs, output))


class _RegionBlockHook(ModelHook):
    def __init__(self, selector: TokenSelector, region: RegionRuntime, is_first: bool, is_last: bool):
        super().__init__()
        self.selector = selector
        self.region = region
        self.is_first = is_first
        self.is_last = is_last

    def new_forward(self, module, *args, **kwargs):
        sel = self.selector
        if sel.mode == OFF or sel.failed:
            if self.is_first:
                self.region.entered = True
            return self.fn_ref.original_forward(*args, **kwargs)
        named = as_kwargs(module, args, kwargs)
        if named is None:
            sel.failed = f"cannot name the arguments of {type(module).__name__}"
            return self.fn_ref.original_forward(*args, **kwargs)
        region = self.region
        if self.is_first:
            sel.enter(region, named)
            if sel.failed:  # nothing gathered yet: this call runs in full
                return self.fn_ref.original_forward(*args, **kwargs)
        else:
            sel.current = region
        if region.sparse:
            named = sel.gather_block_args(region, named, self.is_first)
        output = self.fn_ref.original_forward(**named)
        if self.is_last:
            output = sel.exit(region, output)
        return output


# ---------------------------------------------------------------------------------------------
# attention modules that cannot take a per-sample position tensor


class _PerSampleAttentionHook(ModelHook):
    """Runs an attention module once per sample when its per-token argument has no batch dim.

    FLUX's rotary embedding is (L, D) for the whole batch; with different active tokens per
    sample each sample needs its own rows, so the module runs per sample (``selector.sample``
    tells the K/V router which rows of its caches to use).
    """

    def __init__(self, selector: TokenSelector, arg: str):
        super().__init__()
        self.selector = selector
        self.arg = arg

    def new_forward(self, module, *args, **kwargs):
        sel = self.selector
        region = sel.current
        if region is None or not region.split_needed:
            return self.fn_ref.original_forward(*args, **kwargs)
        named = as_kwargs(module, args, kwargs)
        if named is None:
            raise RuntimeError(f"ditaccel: cannot name the arguments of {type(module).__name__} for a per-sample call")
        b_total = region.batch
        outs = []
        try:
            for b in range(b_total):
                kw = {}
                for key, value in named.items():
                    if key == self.arg and isinstance(value, (tuple, list)):
                        kw[key] = type(value)(v[b] for v in value)
                    elif key == self.arg and isinstance(value, torch.Tensor):
                        kw[key] = value[b]
                    elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == b_total:
                        kw[key] = value[b:b + 1]
                    else:
                        kw[key] = value
                sel.sample = b
                outs.append(self.fn_ref.original_forward(**kw))
        finally:
            sel.sample = None
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs, dim=0)
        return type(outs[0])(torch.cat(parts, dim=0) if isinstance(parts[0], torch.Tensor) else parts[0]
                             for parts in zip(*outs))


def install_per_sample_attention(selector: TokenSelector, hook_name: str) -> list[nn.Module]:
    arg = selector.facts.split_attention_arg
    if arg is None:
        return []
    hooked = []
    try:
        for region in selector.regions:
            if not any(not a.batched for a in region.region.per_token):
                continue
            for _, module in region.attention:
                attach_hook(module, _PerSampleAttentionHook(selector, arg), hook_name)
                hooked.append(module)
    except BaseException:
        for module in hooked:
            detach_hook(module, hook_name)
        raise
    return hooked


__all__ = [
    "OFF", "RECORD", "SPARSE", "TokenSelector", "RegionRuntime", "keep_index", "gather_tokens", "scatter_tokens",
    "as_kwargs", "install_per_sample_attention",
]
