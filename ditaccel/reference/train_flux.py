"""Train the tiny FLUX-architecture reference model (``flux_tiny``) on procedural shapes.

Run::

    PYTHONPATH=/work/main python -m ditaccel.reference.train_flux --out ditaccel/reference/checkpoints/flux_tiny --seed 0

Two stages, both on CPU with one thread by default:

1. a tiny ``diffusers.AutoencoderKL`` (block_out_channels=(32, 64) -> VAE scale factor 2,
   16 latent channels, no mid-block attention) trained on 32x32 crops of procedural images
   with L1 + MSE reconstruction loss and a small KL term; ``shift_factor``/``scaling_factor``
   are then set from the mean/std of the latent posterior means;
2. a ``diffusers.FluxTransformer2DModel`` (2 double-stream + 4 single-stream blocks, 4 heads x
   32 dims, RoPE axes (8, 12, 12)) trained with rectified flow exactly as ``FluxPipeline``
   samples it: ``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, transformer timestep ``s``
   (the pipeline passes ``t / 1000`` with ``t = 1000 s``).  ``s`` is logit-normal(0, 1) pushed
   through the same resolution-dependent exponential time shift the pipeline's scheduler uses
   (mu = 0.5 at 256 tokens).  Every ``--hires-every``-th step uses 128x128 images (1024 tokens)
   so the model is trained at both token counts.  10 % of the samples get the null prompt so
   true classifier-free guidance works.

Conditioning is one fixed random T5-like ``prompt_embeds`` (8 tokens x 64) and one CLIP-like
``pooled_prompt_embeds`` (64) per class, plus one for the empty/null prompt, stored in
``prompts.safetensors`` with ``prompts.json`` (class name -> row; ``""`` is the null prompt).

The number of optimisation steps is fixed by ``--vae-steps``/``--dit-steps`` so a given seed
reproduces the same weights on the same software stack.  ``--minutes`` is only a wall-clock
safety cap: if it is hit, DiT training stops early and ``train_log.json`` records
``reproduce_with`` (``--dit-steps N --dit-stop-after K``), which replays exactly that run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditaccel.reference.data import CLASS_NAMES, NUM_CLASSES, make_images

DEFAULT_OUT = Path(__file__).resolve().parent / "checkpoints" / "flux_tiny"

TEXT_TOKENS = 8
JOINT_DIM = 64
POOLED_DIM = 64
LATENT_CHANNELS = 16

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=64,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=None,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def make_prompt_table(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Fixed random per-class embeddings; row ``NUM_CLASSES`` is the null ("") prompt."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = NUM_CLASSES + 1
    prompt_embeds = torch.randn(n, TEXT_TOKENS, JOINT_DIM, generator=g)
    pooled = torch.randn(n, POOLED_DIM, generator=g)
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    index[""] = NUM_CLASSES
    return prompt_embeds, pooled, index


def _cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def optimise_with_ema(loss: torch.Tensor, opt, params, model: torch.nn.Module, ema: dict, step: int) -> torch.Tensor:
    """One clipped AdamW step on ``loss``, then the EMA of ``model``'s weights (decay warms up to
    0.995).  Returns the pre-clip gradient norm.  Shared by the reference-model trainers."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(0.995, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
    return gn


def _random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    h = x.shape[-1]
    i, j = torch.randint(0, h - size + 1, (2,), generator=gen).tolist()
    return x[..., i : i + size, j : j + size]


def train_vae(vae, steps: int, batch: int, lr: float, gen: torch.Generator, deadline: float, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=20)
        x, _ = make_images(batch, 64, gen)
        x = _random_crop(x, 32, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"[vae] step {step:4d}/{steps} rec {rec.item():.4f} kl/dim {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
        if time.time() > deadline:
            print(f"[vae] wall-clock cap reached at step {step}; stopping early", flush=True)
            log["vae_stopped_early_at"] = step
            break
    vae.eval()
    log["vae_steps_done"] = len(losses)
    log["vae_seconds"] = time.time() - t0
    log["vae_final_rec_loss_avg20"] = sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def vae_eval(vae, gen: torch.Generator) -> dict:
    x, _ = make_images(64, 64, gen)
    post = vae.encode(x).latent_dist
    y = vae.decode(post.mean).sample.clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()
    return {"vae_psnr_db": 10 * math.log10(1.0 / mse), "latent_mean": post.mean.mean().item(), "latent_std": post.mean.std().item()}


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Images -> normalised latents, exactly inverse to FluxPipeline's decode path."""
    z = vae.encode(x).latent_dist.mean
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(h2: int, w2: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h2, w2, "cpu", torch.float32)


def shifted_sigmas(u: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Apply the scheduler's dynamic (exponential) time shift for ``seq_len`` tokens to ``u`` in (0, 1)."""
    c = SCHEDULER_CONFIG
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = seq_len * m + (c["base_shift"] - m * c["base_image_seq_len"])
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def train_dit(
    transformer,
    vae,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    hires_every: int,
    gen: torch.Generator,
    deadline: float,
    log: dict,
    stop_after: int | None = None,
    start_step: int = 0,
) -> dict:
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    txt_ids = torch.zeros(TEXT_TOKENS, 3)
    transformer.train()
    losses, losses_hi = [], []
    t0 = time.time()
    for step in range(start_step, steps):
        for group in opt.param_groups:
            # a resumed stage starts with fresh Adam moments: re-warm over 10 steps
            rewarm = min(1.0, (step - start_step + 1) / 10) if start_step else 1.0
            group["lr"] = _cosine_lr(step, steps, lr, warmup=40) * rewarm
        hires = hires_every > 0 and step % hires_every == hires_every - 1
        size, b = (128, max(1, batch // 4)) if hires else (64, batch)
        x, labels = make_images(b, size, gen)
        x0 = pack(encode_latents(vae, x))
        seq = x0.shape[1]
        side = size // 4  # packed tokens per side (VAE /2, pack /2)
        drop = torch.rand(b, generator=gen) < 0.1
        cls = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        u = torch.sigmoid(torch.randn(b, generator=gen))
        sigma = shifted_sigmas(u, seq).clamp(1e-4, 1.0)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(b, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = transformer(
            hidden_states=xt,
            encoder_hidden_states=prompt_embeds[cls],
            pooled_projections=pooled[cls],
            timestep=sigma,
            img_ids=image_ids(side, side),
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, eps - x0)
        gn = optimise_with_ema(loss, opt, params, transformer, ema, step)
        (losses_hi if hires else losses).append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            avg = sum(losses[-25:]) / max(1, len(losses[-25:]))
            done = step + 1 - start_step
            print(
                f"[dit] step {step:4d}/{steps} loss(avg25,64px) {avg:.4f} grad {gn.item():.2f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s (eta {el / done * (steps - step - 1):.0f}s)",
                flush=True,
            )
        if stop_after is not None and step + 1 >= stop_after:
            break
        if time.time() > deadline:
            print(f"[dit] wall-clock cap reached at step {step}; stopping early", flush=True)
            log["dit_stopped_early_at"] = step
            log["reproduce_with"] = f"--dit-steps {steps} --dit-stop-after {step + 1}"
            break
    transformer.eval()
    log["dit_steps_done"] = start_step + len(losses) + len(losses_hi)
    log["dit_seconds"] = time.time() - t0
    log["dit_final_loss_avg50_64px"] = sum(losses[-50:]) / max(1, len(losses[-50:]))
    log["dit_final_loss_avg10_128px"] = sum(losses_hi[-10:]) / max(1, len(losses_hi[-10:]))
    log["dit_loss_curve_64px"] = [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)]
    return ema


def save_pipeline(out: Path, vae, transformer, prompt_embeds, pooled, index) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae.to(torch.float16),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer.to(torch.float16),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    vae.to(torch.float32)
    transformer.to(torch.float32)
    save_file(
        {"prompt_embeds": prompt_embeds.contiguous(), "pooled_prompt_embeds": pooled.contiguous()},
        str(out / "prompts.safetensors"),
    )
    (out / "prompts.json").write_text(json.dumps(index, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output pipeline folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock safety cap for both stages together")
    ap.add_argument("--vae-steps", type=int, default=450)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--dit-steps", type=int, default=800)
    ap.add_argument("--dit-batch", type=int, default=16)
    ap.add_argument("--dit-lr", type=float, default=1e-3)
    ap.add_argument(
        "--dit-stop-after",
        type=int,
        default=None,
        help="stop after this many DiT steps (LR schedule still planned for --dit-steps); reproduces a run the wall-clock cap cut short",
    )
    ap.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        help="continue DiT training from a saved pipeline folder (its VAE is reused, VAE training skipped)",
    )
    ap.add_argument("--dit-start-step", type=int, default=0, help="with --resume-from: step to resume the LR schedule at")
    ap.add_argument("--hires-every", type=int, default=6, help="every N-th DiT step uses 128x128 images (0: never)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-stats", action="store_true", help="skip writing sample_stats.json after training")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    deadline = start + 60 * args.minutes
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
    import diffusers

    log["diffusers"] = diffusers.__version__

    if args.resume_from is not None:
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        prev = args.resume_from / "train_log.json"
        log["previous_stage"] = json.loads(prev.read_text()) if prev.is_file() else None
        # resumed stages draw fresh data from a generator keyed on (seed, start step)
        gen = torch.Generator().manual_seed(args.seed * 100_003 + args.dit_start_step)
        vae = AutoencoderKL.from_pretrained(args.resume_from / "vae").to(torch.float32).eval()
        for p in vae.parameters():
            p.requires_grad_(False)
        log["shift_factor"], log["scaling_factor"] = vae.config.shift_factor, vae.config.scaling_factor
    else:
        gen = torch.Generator().manual_seed(args.seed)
        vae = build_vae()
        vae_deadline = start + 60 * args.minutes * 0.2
        train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, gen, min(deadline, vae_deadline), log)
        # latent statistics -> shift/scale so normalised latents are ~zero-mean unit-variance
        with torch.no_grad():
            x, _ = make_images(256, 64, torch.Generator().manual_seed(args.seed + 1))
            z = vae.encode(x).latent_dist.mean
        shift, scale = z.mean().item(), 1.0 / z.std().item()
        vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
        log.update(vae_eval(vae, torch.Generator().manual_seed(args.seed + 2)))
        log["shift_factor"], log["scaling_factor"] = vae.config.shift_factor, vae.config.scaling_factor
        print(f"[vae] eval {json.dumps({k: log[k] for k in ('vae_psnr_db', 'shift_factor', 'scaling_factor')})}", flush=True)
        for p in vae.parameters():
            p.requires_grad_(False)

    prompt_embeds, pooled, index = make_prompt_table(args.seed)
    if args.resume_from is not None:
        transformer = FluxTransformer2DModel.from_pretrained(args.resume_from / "transformer").to(torch.float32)
    else:
        transformer = build_transformer()
    ema = train_dit(
        transformer, vae, prompt_embeds, pooled, args.dit_steps, args.dit_batch, args.dit_lr, args.hires_every, gen, deadline, log,
        stop_after=args.dit_stop_after,
        start_step=args.dit_start_step if args.resume_from is not None else 0,
    )
    transformer.load_state_dict(ema)
    log["total_minutes"] = (time.time() - start) / 60
    save_pipeline(args.out, vae, transformer, prompt_embeds, pooled, index)
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved to {args.out} after {log['total_minutes']:.1f} min", flush=True)
    if not args.no_stats:
        from ditaccel.reference.pipelines import write_sample_stats

        write_sample_stats("flux_tiny", folder=args.out)


if __name__ == "__main__":
    main()
