"""Region-adaptive sampling (RAS) in ComfyUI: ComfyUI's token facts, and block patches that drive
RAS's own token selector.

The method object is ditaccel's :class:`~ditaccel.methods.ras.RAS` (schedule, scores, the
earliest-deadline-first selection, per-branch state), built with ComfyUI's token facts instead of
diffusers'; its :class:`~ditaccel.hooks.token_select.TokenSelector` (gather at a region's first
block, per-token block arguments, scatter at its last block with the stored rows of inactive
tokens) and :class:`~ditaccel.attention.kv_cache.CachedKVRouter` (attention of the active tokens
over the cached keys/values of the inactive ones) are driven through ComfyUI's mechanisms instead
of module hooks:

* ``patches_replace["dit"]`` block patches (:meth:`ComfyRAS.run_block`): the args dict a patch
  receives is the block's keyword arguments, so the selector's ``enter`` / ``gather_block_args`` /
  ``exit`` run on it unchanged (hidden stream ``img``, text stream ``txt``, rotary table ``pe``);
* ``optimized_attention_override`` (:meth:`ComfyRAS.attend`): q/k/v of each self-attention call
  (after ComfyUI's RoPE) go to the K/V router, which records them on full calls and, on sparse
  calls, lets the kept queries attend to the whole cached sequence.

Token regions, read from ComfyUI's model code (comfy.ldm.flux.model.Flux.forward_orig,
comfy.ldm.chroma.model.Chroma.forward_orig, comfy.ldm.wan.model.WanModel.forward_orig):

* FLUX: two regions. The double blocks take ``img`` (image tokens) and ``txt`` and attend over
  [txt, img] with ``pe`` (B, 1, L, D/2, 2, 2) over that joint sequence; between the double and the
  single blocks the forward concatenates ``torch.cat((txt, img), 1)``, so the single blocks' ``img``
  is the joint [text, image] sequence, and so is their ``pe``. Each run is one region: image tokens
  are gathered at its first block and scattered back at its last, so the concatenation, the final
  layer and the unpatchify see the full grid.
* Chroma: the same two regions (its forward has FLUX's token flow; its modulations are per sample).
  A Chroma that skips blocks (``skip_mmdit`` / ``skip_dit``) runs without RAS.
* Wan (t2v / i2v ``WanModel`` only): one region over ``blocks``; ``pe`` (1, N, 1, D/2, 2, 2) over the
  image tokens; a per-frame or per-token modulation ``vec`` (Wan 2.2: (B, T, 6, C), spread over the
  tokens by ComfyUI's ``repeat_e``) is spread the same way and gathered too; the text (and
  CLIP image) context enters by cross-attention (the block's 2nd/3rd attention calls), which runs
  unchanged. The VACE, camera, S2V and HuMo variants add per-token inputs between blocks, which
  need the full grid: refused.

Calls that change the token layout (FLUX Kontext reference latents, ControlNet residuals added
between blocks, attention masks; Wan reference latents and time concatenation) run in full
(RAS's ``dense_if_args``); latents whose height or width is not a multiple of the patch size (which
ComfyUI pads and crops) bypass RAS.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...adapters.tokens import (HIDDEN, HIDDEN_IMAGE, HIDDEN_TEXT_IMAGE_PAD, IMAGE, JOINT, OUT_GRID, TEXT_FIRST,
                                PerTokenArg, TokenFacts, TokenRegion)
from ...errors import CompositionError, ConfigError, UnsupportedModelError
from ...hooks.token_select import OFF, gather_tokens
from ...methods.ras import RAS
from .families import SCOPE_BLOCKS

_TWO_STREAM_OUT = ("hidden", "encoder")  # a FLUX double-block patch returns {"img", "txt"}


def _latent_tokens(patch: tuple[int, ...]):
    def image_tokens(model, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        spatial = tuple(x.shape[2:])
        grid = tuple(math.ceil(s / p) for s, p in zip(spatial, patch))
        return math.prod(grid), grid

    return image_tokens


FLUX_FACTS = TokenFacts(
    family="flux",
    regions=(
        TokenRegion(blocks=("double_blocks",), hidden_arg="img", hidden_layout=HIDDEN_IMAGE, encoder_arg="txt",
                    outputs=_TWO_STREAM_OUT, per_token=(PerTokenArg("pe", JOINT, seq_dim=2),)),
        TokenRegion(blocks=("single_blocks",), hidden_arg="img", hidden_layout=HIDDEN_TEXT_IMAGE_PAD,
                    per_token=(PerTokenArg("pe", HIDDEN, seq_dim=2),)),
    ),
    image_tokens=_latent_tokens((2, 2)),
    output_layout=OUT_GRID,
    patch=lambda model: (1, int(model.patch_size), int(model.patch_size)),
    joint_order=TEXT_FIRST,
    dense_if_args=("ref_latents", "control", "attention_mask"),
    notes="ComfyUI FLUX: double blocks on image tokens (joint attention with txt), single blocks on [txt, img].",
)

# Chroma's forward_orig is FLUX's for the tokens: double blocks on (img, txt, pe over [txt, img]),
# cat(txt, img), single blocks on the joint sequence, then the image rows to the final layer; its
# per-block modulations (``vec``) are per sample, not per token.
CHROMA_FACTS = dataclasses.replace(
    FLUX_FACTS, family="chroma", dense_if_args=("control", "attention_mask"),
    notes="ComfyUI Chroma: as FLUX (modulations from the approximator, per sample).")

WAN_FACTS = TokenFacts(
    family="wan",
    regions=(TokenRegion(blocks=("blocks",), hidden_arg="img", hidden_layout=HIDDEN_IMAGE,
                         per_token=(PerTokenArg("pe", IMAGE, seq_dim=1),)),),
    image_tokens=_latent_tokens((1, 2, 2)),
    output_layout=OUT_GRID,
    patch=lambda model: tuple(int(p) for p in model.patch_size),
    # the block's 2nd (text) and, for i2v, 3rd (CLIP image) attention calls are cross-attention
    cross_attention=("attention1", "attention2"),
    dense_if_args=("reference_latent", "time_dim_concat"),
    notes="ComfyUI Wan t2v/i2v: blocks on image tokens, text by cross-attention.",
)

# (family, (module, class) the diffusion model must be exactly, facts)
_SUPPORTED = {
    "flux": ((("comfy.ldm.flux.model", "Flux"),), FLUX_FACTS),
    "chroma": ((("comfy.ldm.chroma.model", "Chroma"),), CHROMA_FACTS),
    "wan": ((("comfy.ldm.wan.model", "WanModel"),), WAN_FACTS),
}

WHY_NOT = {
    "sd3": "ComfyUI's MMDiT adds its learned position table and runs its joint blocks through code not mapped "
           "for token selection yet",
    "lumina2": "ComfyUI's NextDiT has no block patches",
    "hunyuan_video": "no RAS token facts for HunyuanVideo (not on the diffusers path either)",
    "ltxv": "no RAS token facts for LTX-Video (not on the diffusers path either)",
    "qwen_image": "no RAS token facts for Qwen-Image (not on the diffusers path either)",
}


class ComfyRAS(RAS):
    """RAS with ComfyUI's token facts, driven by the ComfyUI engine's block patches and attention
    override. Everything about *which* tokens run and what inactive tokens get is RAS's."""

    def __init__(self, engine, config):
        dm = engine.model
        family = engine.adapter.family
        if family not in _SUPPORTED:
            raise UnsupportedModelError(
                f"RAS in ComfyUI runs on FLUX, Chroma and Wan (t2v/i2v); not on {family}: "
                f"{WHY_NOT.get(family, 'no token facts for this family')}.")
        classes, facts = _SUPPORTED[family]
        if (type(dm).__module__, type(dm).__name__) not in classes:
            raise UnsupportedModelError(
                f"RAS in ComfyUI runs on the plain {'/'.join(c for _, c in classes)} model; "
                f"{type(dm).__module__}.{type(dm).__name__} adds per-token inputs between blocks (VACE hints, "
                "camera or audio features) that need the full token grid.")
        if engine.scope != SCOPE_BLOCKS:
            raise ConfigError(f"RAS needs ComfyUI's block patches (cache scope 'blocks' or 'auto'); got scope "
                              f"{engine.scope!r}.")
        super().__init__(engine, config, facts=facts)
        # (patch kind, index) -> (region, first, last); block keys come from the engine's adapter
        keys = engine.block_keys
        self.block_regions: dict[tuple[str, int], tuple] = {}
        for region in self.selector.regions:
            last = len(region.blocks) - 1
            for i, (_, block) in enumerate(region.blocks):
                self.block_regions[keys[id(block)]] = (region, i == 0, i == last)
        self._bypass = False

    # -- per call --------------------------------------------------------------------------------
    def _layout_ok(self, call) -> bool:
        x = call.args[0] if call.args else None
        if not isinstance(x, torch.Tensor):
            return False
        patch = self.facts.patch(self.model)[-(x.ndim - 2):]
        # Chroma "lite" skips blocks (skip_mmdit / skip_dit): a region's first or last block may not run
        skipped = getattr(self.model, "skip_mmdit", None) or getattr(self.model, "skip_dit", None)
        return not skipped and all(s % p == 0 for s, p in zip(x.shape[2:], patch))

    def begin_call(self, call) -> None:
        self._bypass = self.config.active_fraction < 1.0 and not self._layout_ok(call)
        if self._bypass:
            self.warn_once("layout", "a latent whose height/width is not a multiple of the patch size "
                                     "(ComfyUI pads and crops it), or a model that skips blocks, ran without RAS.")
            self._mode = OFF
            self.router.active = False
            self.selector.begin(OFF, call.info.branch)
            return
        super().begin_call(call)

    def end_call(self, call, output):
        if self._bypass:
            self.selector.end()
            return output
        return super().end_call(call, output)

    # -- block patches ---------------------------------------------------------------------------
    def run_block(self, kind: str, index: int, args: dict, compute):
        entry = self.block_regions.get((kind, index))
        sel = self.selector
        if entry is None:
            return compute(args)
        region, first, last = entry
        if sel.mode == OFF or sel.failed:
            if first:
                region.entered = True
            return compute(args)
        if first:
            sel.enter(region, args)
            if sel.failed:  # nothing gathered yet: this call runs in full
                return compute(args)
        else:
            sel.current = region
        named = args
        if region.sparse:
            named = sel.gather_block_args(region, args, first)
            vec = args.get("vec")
            if self.facts is WAN_FACTS and isinstance(vec, torch.Tensor) and vec.ndim == 4 and vec.shape[1] > 1:
                named["vec"] = self._gather_modulation(region, vec)
        out = compute(named)
        if last:
            spec = region.region
            if len(spec.outputs) == 1:
                out = dict(out, img=sel.exit(region, out["img"]))
            else:
                h, e = sel.exit(region, (out["img"], out.get("txt")))
                out = dict(out, img=h, txt=e)
        return out

    @staticmethod
    def _gather_modulation(region, vec: torch.Tensor) -> torch.Tensor:
        """Wan's modulation ``vec`` (B, T, 6, C) with one row per frame (or per token, T = N): the
        block spreads it over the tokens with ComfyUI's ``repeat_e``; spread to the N image tokens the
        same way, then take the active ones. (B, 1, 6, C) broadcasts and is never gathered."""
        key = ("vec", id(vec))
        if key not in region.memo:
            from comfy.ldm.wan.model import repeat_e

            full = repeat_e(vec, vec.new_empty((1, region.image_tokens, 1)))
            region.memo[key] = (vec, gather_tokens(full, region.image_index, 1))
        return region.memo[key][1]

    # -- attention override ----------------------------------------------------------------------
    def attend(self, site, a):
        """The K/V router's output for one attention call (None: the dense path)."""
        if not self.router.active:
            return None
        out = self.router.attend(site, a.to_bhld(a.q), a.to_bhld(a.k), a.to_bhld(a.v), a.mask, None)
        return None if out is None else a.from_bhld(out)


def build_ras(engine, config) -> ComfyRAS:
    if len(engine.spec.configs) > 1:
        others = [c.method_name for c in engine.spec.configs if c is not config]
        raise CompositionError(
            f"RAS in ComfyUI runs alone; it was combined with {', '.join(others)}. Its blocks compute only some "
            "tokens, which step caches and sparse attentions (built for the full token grid) cannot share.")
    return ComfyRAS(engine, config)
