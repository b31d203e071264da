"""Benchmark: dual-model sampling on a flow-matching (SD3-architecture) transformer, relative to one model.

The same figures as ``bench_sampling.py`` (which times an SD UNet), for ``StableDiffusion3Backbone``'s
``forward_network`` on an ``SD3Transformer2DModel`` with random weights and a LoRA (rank 32 on the attention
projections of both streams, :data:`rdt_lib.backbones.flow.FLOW_LORA_TARGETS`):

- wall-time ratios to single-model sampling: ``switch@0.75`` (target <= 1.05 of the tuned model alone) and
  ``power:2`` (both models every step; batched in one forward pass, and as two passes);
- peak memory of the single-copy LoRA mode (``power:2``) relative to one model (target <= 1.10), and of two
  copies of the transformer for comparison.

Euler sampler on the ``normal`` sigma list (diffusers' SD3 default), CFG on both models (the backbone's 7.0).
Prompts are fixed random embeddings of the real sequence length (77 CLIP + ``--t5-tokens`` T5 tokens) and there
is no VAE: the denoising loop alone is timed. Timing, interleaving and memory measurement as in
``bench_sampling.py`` (whose helpers this script uses).

Usage::

    python bench/bench_flow_sampling.py                                   # small SD3-layout transformer, CPU
    python bench/bench_flow_sampling.py --size sd35m --device cuda --dtype bf16 --height 1024 --width 1024 --steps 28
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from bench_sampling import DTYPES, peak_bytes_of, time_runs  # noqa: E402
from rdt_lib.backbones.base import Conditioning  # noqa: E402
from rdt_lib.backbones.flow import FLOW_LORA_TARGETS  # noqa: E402
from rdt_lib.backbones.sd3 import StableDiffusion3Backbone  # noqa: E402
from rdt_lib.lora import add_lora  # noqa: E402

TRANSFORMER_SIZES = {
    # a small SD3-layout MMDiT: 4 joint blocks of width 256
    "small": dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                  pooled_projection_dim=256, pos_embed_max_size=96),
    # the SD3.5-Medium architecture (about 2.5B parameters): 24 blocks of width 1536, dual attention in 0-12, QK norm
    "sd35m": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                  qk_norm="rms_norm"),
}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


class TransformerOnlyBackbone(StableDiffusion3Backbone):
    """The SD3 backbone's network call on a bare transformer: fixed random prompt embeddings, no VAE."""

    def __init__(self, transformer, t5_tokens: int) -> None:  # no pipeline: text encoders and VAE left out
        self.network = transformer
        self.scheduler_config = SCHEDULER_CONFIG
        self.seq_len = 77 + t5_tokens

    def encode_prompts(self, prompts, *, negative=False):
        g = torch.Generator().manual_seed(1 if negative else 0)
        c = self.network.config
        e = torch.randn(len(prompts), self.seq_len, c.joint_attention_dim, generator=g).to(self.device, self.dtype)
        pooled = torch.randn(len(prompts), c.pooled_projection_dim, generator=g).to(self.device, self.dtype)
        return Conditioning({"encoder_hidden_states": e, "pooled_projections": pooled}, len(prompts))

    def decode(self, latents):
        return latents

    def latent_shape(self, height=None, width=None):
        return (16, height // 8, width // 8)


def build(args, dtype: torch.dtype, lora: bool, rank: int = 32) -> TransformerOnlyBackbone:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype on the target device: no fp32 copy of 2.2B weights
    try:
        with torch.device(args.device):
            net = SD3Transformer2DModel(**TRANSFORMER_SIZES[args.size]).eval()
    finally:
        torch.set_default_dtype(previous)
    if lora:
        add_lora(net, "tuned", rank=rank, target_modules=FLOW_LORA_TARGETS, init_lora_weights=False)
        net.to(device=args.device, dtype=dtype)
    return TransformerOnlyBackbone(net, args.t5_tokens)


FLOW_SAMPLING = dict(sampler="euler", scheduler="normal")  # SD3's own sigma list (StableDiffusion3Pipeline's)


def time_modes(args, dtype) -> tuple[dict[str, list[float]], int]:
    """Seconds of each run per mode, and the plain transformer's parameter count."""
    plain = build(args, dtype, lora=False)
    lora = build(args, dtype, lora=True)
    modes = {"single (plain)": (plain, "single"), "single (tuned: LoRA on)": (lora, "tuned"),
             "switch@0.75": (lora, "switch@0.75"), "power:2 (batched)": (lora, "power:2"),
             "power:2 (two passes)": (lora, "power:2 unbatched")}
    return time_runs(modes, args, **FLOW_SAMPLING), sum(p.numel() for p in plain.network.parameters())


def memory_of(mode: str, args) -> float:
    """Peak bytes attributable to one mode (model build + sampling)."""
    dtype = DTYPES[args.dtype]
    return peak_bytes_of(mode, args, lambda lora: build(args, dtype, lora=lora), **FLOW_SAMPLING)


MEMORY_MODES = ["single", "power:2", "power:2 unbatched", "two-copy power:2"]
CHILD_ARGS = ("size", "device", "dtype", "batch", "steps", "height", "width", "t5_tokens", "threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(TRANSFORMER_SIZES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens per prompt (diffusers' default 256)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-memory", action="store_true", help="time only")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_child:  # one fresh process per memory measurement on CPU
        print(json.dumps({"bytes": memory_of(args.memory_child, args)}))
        return

    print(f"device {args.device}, dtype {args.dtype}, SD3 transformer '{args.size}', batch {args.batch}, {args.steps} Euler steps (normal sigmas, shift 3), {args.height}x{args.width}, "
          f"{77 + args.t5_tokens} text tokens, CFG 7 on both models, LoRA rank 32 on {len(FLOW_LORA_TARGETS)} "
          f"attention projections, torch threads {torch.get_num_threads()}")
    runs, n_params = time_modes(args, DTYPES[args.dtype])
    print(f"transformer parameters: {n_params / 1e6:.1f}M")
    times = {k: statistics.median(v) for k, v in runs.items()}
    fastest = {k: min(v) for k, v in runs.items()}  # less sensitive to other jobs on a shared machine
    ref, ref_tuned = times["single (plain)"], times["single (tuned: LoRA on)"]
    print("\nwall time (median of %d interleaved runs; last column: ratio of the fastest runs)" % args.repeats)
    print(f"{'mode':28s} {'seconds':>9s} {'/ plain':>8s} {'/ tuned':>8s} {'min/tuned':>10s}  target")
    targets = {"switch@0.75": "<= 1.05 (/ tuned)", "power:2 (batched)": "<= 2.05", "power:2 (two passes)": "<= 2.05"}
    for name, t in times.items():
        best = fastest[name] / fastest["single (tuned: LoRA on)"]
        print(f"{name:28s} {t:9.3f} {t / ref:8.3f} {t / ref_tuned:8.3f} {best:10.3f}  {targets.get(name, '')}")
    if args.skip_memory:
        return

    mem = {}
    for mode in MEMORY_MODES:
        if args.device.startswith("cuda"):
            mem[mode] = memory_of(mode, args)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", mode] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in CHILD_ARGS]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mem[mode] = json.loads(out.strip().splitlines()[-1])["bytes"]
    print("\npeak memory attributable to the run (weights + activations)")
    print(f"{'mode':28s} {'MiB':>9s} {'/ single':>9s}  target")
    for mode, b in mem.items():
        label = {"single": "single model", "power:2": "single-copy LoRA, power:2",
                 "power:2 unbatched": "  the same, two passes", "two-copy power:2": "two copies, power:2"}[mode]
        print(f"{label:28s} {b / 2**20:9.1f} {b / mem['single']:9.3f}  {'<= 1.10' if mode == 'power:2' else ''}")


if __name__ == "__main__":
    main()
