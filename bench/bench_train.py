"""Seconds per optimizer step and peak memory of DRaFT-K training, K = 1, 5 and all steps, with and without
gradient checkpointing.

    python bench/bench_train.py                 # small SD-architecture model on CPU (random weights)
    python bench/bench_train.py --full          # full-size SD1.5-architecture UNet/VAE/CLIP-L, 512x512, bf16, CUDA
    python bench/bench_train.py --model sd3     # small SD3-architecture (MMDiT, 16-channel VAE) on CPU, Euler
    python bench/bench_train.py --model sd3 --full   # SD3.5-Medium transformer + SD3 VAE + CLIP-L/G, 1024, bf16, CUDA

Each configuration runs in its own subprocess so peak memory is per configuration: CPU peak RSS
(``resource.getrusage`` max RSS of the child, which includes the model and Python itself) or CUDA
``torch.cuda.max_memory_allocated``. The reward is a stand-in (a fixed random conv net on the decoded image),
so the figures are the diffusion side of the cost; a real reward model adds its own activations. The LoRA is
rank 4 on the attention projections, DDIM, CFG 7.5, batch 1. SD3 (``--model sd3``): rank 4 on both streams'
attention projections, Euler on the SD3 pipeline's sigma list (``scheduler="auto"``), CFG 7.0, batch 1; the full
size leaves out T5-XXL (``text_encoder_3=None``, as diffusers allows), so its prompt encoding is not in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_pipeline(full: bool, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from sd_fixtures import _load_tokenizer, write_tiny_clip_tokenizer_files

    tok = _load_tokenizer(write_tiny_clip_tokenizer_files(Path(tempfile.mkdtemp()) / "tok"))
    torch.manual_seed(0)
    if full:  # SD1.5 architecture
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    else:  # small: SD1.5 layout scaled down, 64x64 images, 32x32 latents
        unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=64, attention_head_dim=8,
                                    block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            sample_size=64)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def build_sd3_pipeline(full: bool, device: str, dtype):
    """An SD3 pipeline with random weights: small (4 MMDiT blocks of width 128, the test fixtures' text encoders and
    16-channel VAE with one 2x downsampling) or SD3.5-Medium's transformer (24 blocks, width 1536, dual attention
    in blocks 0-12, qk RMS norm), SD3's VAE (8x, 16 channels) and CLIP-L / CLIP-G, without T5."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import StableDiffusion3Pipeline

    from flow_fixtures import make_tiny_sd3_components, make_tiny_sd3_transformer

    torch.manual_seed(0)
    if not full:
        parts = make_tiny_sd3_components()
        parts["transformer"] = make_tiny_sd3_transformer(num_layers=4, attention_head_dim=32, num_attention_heads=4,
                                                         caption_projection_dim=128, sample_size=32)
        return StableDiffusion3Pipeline(**parts).to(device=device, dtype=dtype)
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sd_fixtures import _load_tokenizer, write_tiny_clip_tokenizer_files

    tok = _load_tokenizer(write_tiny_clip_tokenizer_files(Path(tempfile.mkdtemp()) / "tok"))
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm").to(dtype)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False).to(dtype)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768)).to(dtype)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1000, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280)).to(dtype)
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip_l, tokenizer=tok,
                                    text_encoder_2=clip_g, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def child(args) -> None:
    import resource

    import torch

    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from rdt_lib.lora import add_lora
    from rdt_lib.objectives import DraftK
    from rdt_lib.train.trainer import RewardTrainer, TrainerSettings

    torch.set_num_threads(args.threads)
    device = "cuda" if args.full else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    if args.model == "sd3":
        from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
        from rdt_lib.backbones.sd3 import StableDiffusion3Backbone

        pipe = build_sd3_pipeline(args.full, device, dtype)
        bb = StableDiffusion3Backbone.from_pipeline(pipe)
        if not args.full:
            bb.max_sequence_length = 16  # the tiny T5's
        targets, cfg = FLOW_LORA_TARGETS, 7.0
    else:
        pipe = build_pipeline(args.full, device, dtype)
        bb = StableDiffusionBackbone.from_pipeline(pipe)
        targets, cfg = ("to_q", "to_k", "to_v", "to_out.0"), 7.5
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    add_lora(bb.network, "tuned", rank=4, init_lora_weights="gaussian", target_modules=targets)
    if args.gc:
        bb.network.enable_gradient_checkpointing()
        bb.vae.enable_gradient_checkpointing()
    conv = torch.nn.Conv2d(3, 8, 5, stride=4).to(device)
    conv.requires_grad_(False)

    def reward(images, prompts):
        return torch.tanh(conv(images.float())).mean(dim=(1, 2, 3))

    k = None if args.k == 0 else args.k
    obj = DraftK(num_steps=args.steps, k=k, cfg_scale=cfg, height=args.size, width=args.size)
    accel = None
    if args.full:
        from accelerate import Accelerator

        accel = Accelerator(mixed_precision="bf16")
    trainer = RewardTrainer(bb, obj, reward, ["a photo of a cat"], accelerator=accel,
                            settings=TrainerSettings(lr=1e-4, batch_size=1, seed=0))
    trainer.step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.repeat):
        trainer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / args.repeat
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        unit = "GiB (CUDA max allocated)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        unit = "GiB (peak RSS)"
    print(json.dumps({"k": args.k, "gc": args.gc, "sec_per_step": sec, "peak": peak, "unit": unit}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "sd3"), default="sd15", help="architecture (default sd15)")
    parser.add_argument("--full", action="store_true", help="full size on CUDA in bf16: SD1.5 UNet at 512x512, or "
                                                           "the SD3.5-Medium transformer at 1024x1024")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 small; full: 25 SD1.5, "
                                                                "28 SD3)")
    parser.add_argument("--repeat", type=int, default=2, help="timed optimizer steps per configuration")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--ks", default="1,5,0", help="K values, 0 = all steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or ((28 if args.model == "sd3" else 25) if args.full else 10)
    args.size = args.size or ((1024 if args.model == "sd3" else 512) if args.full else 64)
    if args.child:
        child(args)
        return
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        for gc in (False, True):
            cmd = [sys.executable, __file__, "--child", "--k", str(k), "--steps", str(args.steps), "--repeat",
                   str(args.repeat), "--threads", str(args.threads), "--size", str(args.size), "--model", args.model]
            cmd += ["--gc"] if gc else []
            cmd += ["--full"] if args.full else []
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                print(f"K={k} gc={gc}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[-1]))
            r = rows[-1]
            print(f"K={'all' if k == 0 else k:>3}  grad ckpt={'on ' if gc else 'off'}  {r['sec_per_step']:7.2f} s/step  "
                  f"peak {r['peak']:6.2f} {r['unit']}", flush=True)
    if args.model == "sd3":
        what = (f"SD3.5-Medium transformer, {args.size}x{args.size}, bf16, CUDA, no T5" if args.full else
                f"small SD3-architecture MMDiT, {args.size}x{args.size}, fp32, CPU")
        how = f"{args.steps} Euler steps, batch 1, CFG 7.0"
    else:
        what = ("full-size SD1.5 UNet, 512x512, bf16, CUDA" if args.full else
                f"small SD-architecture UNet, {args.size}x{args.size}, fp32, CPU")
        how = f"{args.steps} DDIM steps, batch 1, CFG 7.5"
    print(f"\n| K | grad ckpt | s/step | peak memory |  ({what}, {how})")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {'all' if r['k'] == 0 else r['k']} | {'on' if r['gc'] else 'off'} | {r['sec_per_step']:.2f} | "
              f"{r['peak']:.2f} {r['unit'].split(' ')[0]} |")


if __name__ == "__main__":
    main()
