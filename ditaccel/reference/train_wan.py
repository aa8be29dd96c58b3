"""Train the tiny Wan-architecture video reference model (``wan_tiny``) on moving procedural shapes.

Run::

    PYTHONPATH=/work/main python -m ditaccel.reference.train_wan --out ditaccel/reference/checkpoints/wan_tiny --seed 0

1. a tiny ``diffusers.AutoencoderKLWan`` (base_dim 16, dim_mult [1, 2], one spatio-temporal
   downsample: 2x in space, 2x in time with Wan's causal first frame, z_dim 8) trained on 5-frame
   32x32 clips (5 frames -> 3 latent frames); per-channel ``latents_mean``/``latents_std`` are
   set from the latent statistics (WanPipeline normalises per channel);
2. a ``diffusers.WanTransformer3DModel`` (4 layers, 4 heads x 32, ffn 512, patch (1, 2, 2):
   3 x 8 x 8 = 192 tokens per clip) trained with rectified flow the way ``WanPipeline`` +
   ``FlowMatchEulerDiscreteScheduler(shift=2)`` samples it: ``x_t = (1 - s) x0 + s eps``,
   target ``eps - x0``, transformer timestep ``1000 s`` (WanPipeline passes ``t`` unscaled),
   ``s`` = logit-normal pushed through the static shift 2.  10 % null-prompt dropout for CFG.

Conditioning: one fixed random "UMT5-like" ``prompt_embeds`` (8 tokens x 64) per class plus a
null row, in ``prompts.safetensors``/``prompts.json`` (``""`` = null prompt), like flux_tiny.
As for flux_tiny, ``--minutes`` is only a wall-clock safety cap; a capped run records
``reproduce_with`` in ``train_log.json``. The defaults are the 2-core CPU recipe the shipped
checkpoint was trained with (2 threads, VAE 1000 x 8 clips, DiT 3300 x 16 clips: 47.8 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditaccel.reference.data import CLASS_NAMES, NUM_CLASSES, make_clips
from ditaccel.reference.train_flux import _cosine_lr, optimise_with_ema

DEFAULT_OUT = Path(__file__).resolve().parent / "checkpoints" / "wan_tiny"

TEXT_TOKENS = 8
TEXT_DIM = 64
Z_DIM = 8
FRAMES = 5
SIZE = 32
FLOW_SHIFT = 2.0

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=FLOW_SHIFT, use_dynamic_shifting=False)


def build_vae(latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16,
        z_dim=Z_DIM,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True],
        latents_mean=latents_mean or [0.0] * Z_DIM,
        latents_std=latents_std or [1.0] * Z_DIM,
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    )


def build_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def make_prompt_table(seed: int):
    g = torch.Generator().manual_seed(20_000 + seed)
    prompt_embeds = torch.randn(NUM_CLASSES + 1, TEXT_TOKENS, TEXT_DIM, generator=g)
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    index[""] = NUM_CLASSES
    return prompt_embeds, index


def train_vae(vae, steps, batch, lr, gen, deadline, log, device="cpu", stop_after=None):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = _cosine_lr(step, steps, lr, warmup=20)
        x, _ = make_clips(batch, FRAMES, SIZE, gen)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel() if hasattr(post, "kl") else torch.zeros(())
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"[wan-vae] step {step:4d}/{steps} rec {rec.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if stop_after is not None and step + 1 >= stop_after:
            break
        if time.time() > deadline:
            log["vae_stopped_early_at"] = step
            log["vae_reproduce_with"] = f"--vae-steps {steps} --vae-stop-after {step + 1}"
            print(f"[wan-vae] wall-clock cap reached at step {step}", flush=True)
            break
    vae.eval()
    log["vae_steps_done"] = len(losses)
    log["vae_seconds"] = time.time() - t0
    log["vae_final_rec_loss_avg20"] = sum(losses[-20:]) / len(losses[-20:])


def shifted(u: torch.Tensor) -> torch.Tensor:
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=58.0, help="wall-clock safety cap for both stages")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--dit-steps", type=int, default=3300)
    ap.add_argument("--dit-batch", type=int, default=16)
    ap.add_argument("--dit-lr", type=float, default=7e-4)
    ap.add_argument("--vae-stop-after", type=int, default=None,
                    help="stop after K VAE steps (schedule planned for --vae-steps)")
    ap.add_argument("--vae-minutes", type=float, default=None,
                    help="wall-clock cap for the VAE stage (default: 45%% of --minutes)")
    ap.add_argument("--dit-stop-after", type=int, default=None, help="stop after K DiT steps (schedule planned for --dit-steps)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the 2-core CPU recipe)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (data and noise are drawn on the CPU either way)")
    ap.add_argument("--no-stats", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    deadline = start + 60 * args.minutes
    import diffusers

    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                 "diffusers": diffusers.__version__,
                 "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"}
    gen = torch.Generator().manual_seed(args.seed)

    dev = torch.device(args.device)
    vae = build_vae().to(dev)
    vae_minutes = 0.45 * args.minutes if args.vae_minutes is None else args.vae_minutes
    train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, gen, min(deadline, start + 60 * vae_minutes), log,
              device=dev, stop_after=args.vae_stop_after)
    with torch.no_grad():
        x, _ = make_clips(64, FRAMES, SIZE, torch.Generator().manual_seed(args.seed + 1))
        x = x.to(dev)
        z = vae.encode(x).latent_dist.mean
        mean = z.mean(dim=(0, 2, 3, 4))
        std = z.std(dim=(0, 2, 3, 4))
        y = vae.decode(z).sample.clamp(-1, 1)
        log["vae_psnr_db"] = 10 * math.log10(1.0 / ((y - x) / 2).pow(2).mean().item())
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])
    print(f"[wan-vae] psnr {log['vae_psnr_db']:.2f} dB, latent shape {tuple(z.shape)}", flush=True)
    for p in vae.parameters():
        p.requires_grad_(False)
    m5, s5 = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    prompt_embeds, index = make_prompt_table(args.seed)
    prompt_embeds_dev = prompt_embeds.to(dev)
    tr = build_transformer().to(dev)
    params = list(tr.parameters())
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    tr.train()
    losses, t0 = [], time.time()
    for step in range(args.dit_steps):
        for gr in opt.param_groups:
            gr["lr"] = _cosine_lr(step, args.dit_steps, args.dit_lr, warmup=40)
        b = args.dit_batch
        x, labels = make_clips(b, FRAMES, SIZE, gen)
        with torch.no_grad():
            x0 = (vae.encode(x.to(dev)).latent_dist.mean - m5) / s5
        cls = torch.where(torch.rand(b, generator=gen) < 0.1, torch.full_like(labels, NUM_CLASSES), labels)
        sigma = shifted(torch.sigmoid(torch.randn(b, generator=gen))).clamp(1e-4, 1.0)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        sigma = sigma.to(dev)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds_dev[cls.to(dev)],
                  return_dict=False)[0]
        loss = F.mse_loss(pred, eps - x0)
        gn = optimise_with_ema(loss, opt, params, tr, ema, step)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.dit_steps - 1:
            el = time.time() - t0
            print(
                f"[wan-dit] step {step:4d}/{args.dit_steps} loss(avg25) {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                f"grad {gn.item():.2f} {el:.0f}s (eta {el / (step + 1) * (args.dit_steps - step - 1):.0f}s)",
                flush=True,
            )
        if args.dit_stop_after is not None and step + 1 >= args.dit_stop_after:
            break
        if time.time() > deadline:
            log["dit_stopped_early_at"] = step
            log["reproduce_with"] = f"--dit-steps {args.dit_steps} --dit-stop-after {step + 1}"
            print(f"[wan-dit] wall-clock cap reached at step {step}", flush=True)
            break
    tr.load_state_dict(ema)
    tr.eval()
    vae, tr = vae.cpu(), tr.cpu()
    log["dit_steps_done"] = len(losses)
    log["dit_seconds"] = time.time() - t0
    log["dit_final_loss_avg50"] = sum(losses[-50:]) / len(losses[-50:])
    log["dit_loss_curve"] = [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)]
    log["total_minutes"] = (time.time() - start) / 60

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae.to(torch.float16),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        transformer=tr.to(torch.float16),
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    save_file({"prompt_embeds": prompt_embeds.contiguous()}, str(args.out / "prompts.safetensors"))
    (args.out / "prompts.json").write_text(json.dumps(index, indent=1) + "\n")
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved to {args.out} after {log['total_minutes']:.1f} min", flush=True)
    if not args.no_stats:
        from ditaccel.reference.pipelines import write_sample_stats

        write_sample_stats("wan_tiny", folder=args.out)


if __name__ == "__main__":
    main()
