"""Benchmark: cost of dual-model sampling relative to single-model sampling, measured side by side.

Prints, for an SD-architecture UNet with random weights:
- wall-time ratio of dual-model sampling to single-model sampling for ``switch@0.75`` (target <= 1.05)
  and ``power:2`` (target <= 2.05, the two-evaluations floor; batched evaluation can do better on a GPU),
  with the single-copy LoRA mode (base = adapters off, tuned = LoRA on, one network);
- peak-memory ratio of the single-copy LoRA mode (``power:2``, both models every step) to single-model
  sampling (target <= 1.10), and of the two-copy mode (a second UNet) for comparison.

Time: runs are interleaved (A B C A B C ...) and the median of each is compared, so machine noise hits
all modes alike. Memory: CUDA ``max_memory_allocated``; on CPU the peak resident set size of a fresh
subprocess per mode minus its resident size before the model was built.

Usage::

    python bench/bench_sampling.py                         # small UNet on CPU
    python bench/bench_sampling.py --size sd15 --device cuda --dtype bf16 --height 512 --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rdt_lib.backbones.base import Backbone, Conditioning  # noqa: E402
from rdt_lib.denoisers import ModelBranch  # noqa: E402
from rdt_lib.lora import add_lora  # noqa: E402
from rdt_lib.sampling import sample  # noqa: E402

UNET_SIZES = {
    # a small SD1.5-layout UNet: same block types, fewer channels
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # the SD1.5 UNet architecture (about 860M parameters)
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8),
}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1, "prediction_type": "epsilon"}


class UNetOnlyBackbone(Backbone):
    """A UNet with fixed random prompt embeddings and no VAE: times the denoising loop alone."""

    default_cfg = 7.5

    def __init__(self, unet, seq_len: int = 77) -> None:
        self.network = unet
        self.scheduler_config = SCHEDULER_CONFIG
        self.seq_len = seq_len

    def encode_prompts(self, prompts, *, negative=False):
        g = torch.Generator().manual_seed(1 if negative else 0)
        d = self.network.config.cross_attention_dim
        e = torch.randn(len(prompts), self.seq_len, d, generator=g).to(self.device, self.dtype)
        return Conditioning({"encoder_hidden_states": e}, len(prompts))

    def forward_network(self, x, t, cond):
        return self.network(x, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"], return_dict=False)[0]

    def decode(self, latents):
        return latents

    def latent_shape(self, height=None, width=None):
        return (4, height // 8, width // 8)


def build(size: str, device: str, dtype: torch.dtype, lora: bool, rank: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, **UNET_SIZES[size]).to(device=device, dtype=dtype).eval()
    if lora:
        add_lora(unet, "tuned", rank=rank, init_lora_weights=False)
        unet.to(device=device, dtype=dtype)
    return UNetOnlyBackbone(unet)


def run_mode(bb: Backbone, mode: str, args, second: Backbone | None = None, **sampling) -> None:
    """One sampling run of ``mode`` (``single``, ``tuned``, a schedule with an optional `` unbatched``, or
    ``two-copy power:2`` with ``second`` as the tuned copy); ``sampling``: extra ``sample()`` arguments."""
    prompts = ["p"] * args.batch
    kw = dict(num_steps=args.steps, height=args.height, width=args.width, decode=False, seeds=0, **sampling)
    if mode == "single":
        sample(bb, prompts, **kw)
    elif mode == "two-copy power:2":
        sample(bb, prompts, tuned=ModelBranch(second), schedule="power:2", **kw)
    else:
        schedule, _, variant = mode.partition(" ")
        sample(bb, prompts, tuned=ModelBranch(bb, "tuned"), schedule=schedule, batched=variant != "unbatched", **kw)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(modes: dict[str, tuple[Backbone, str]], args, **sampling) -> dict[str, list[float]]:
    """Seconds of each of ``args.repeats`` interleaved runs per mode (``name -> (backbone, mode)``), after one
    warm-up run of each."""
    with torch.no_grad():
        for bb, mode in modes.values():  # warm-up
            run_mode(bb, mode, args, **sampling)
        times: dict[str, list[float]] = {k: [] for k in modes}
        for _ in range(args.repeats):
            for name, (bb, mode) in modes.items():
                sync(args.device)
                t0 = time.perf_counter()
                run_mode(bb, mode, args, **sampling)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
    return times


def time_modes(args, dtype) -> dict[str, float]:
    plain = build(args.size, args.device, dtype, lora=False)
    lora = build(args.size, args.device, dtype, lora=True)
    modes = {"single (plain UNet)": (plain, "single"), "single (tuned: LoRA on)": (lora, "tuned"),
             "switch@0.75": (lora, "switch@0.75"), "power:2 (batched)": (lora, "power:2"),
             "power:2 (two passes)": (lora, "power:2 unbatched")}
    return {k: statistics.median(v) for k, v in time_runs(modes, args).items()}


def peak_bytes_of(mode: str, args, make: Callable[[bool], Backbone], **sampling) -> float:
    """Peak bytes attributable to one mode: building its model(s) with ``make(lora)`` and one sampling run
    (CUDA: ``max_memory_allocated``; CPU: the peak resident set size, sampled by a thread)."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        watcher = _PeakRss()
    bb = make(mode != "single")
    second = make(False) if mode == "two-copy power:2" else None
    with torch.no_grad():
        run_mode(bb, mode, args, second, **sampling)
    sync(args.device)
    if cuda:
        return float(torch.cuda.max_memory_allocated() - base)
    return float(watcher.stop() - base)


def memory_of(mode: str, args) -> float:
    """Peak bytes attributable to one mode (model build + sampling)."""
    dtype = DTYPES[args.dtype]
    return peak_bytes_of(mode, args, lambda lora: build(args.size, args.device, dtype, lora=lora))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples this process's resident set size every millisecond in a thread; ``stop()`` gives the peak."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_MODES = ["single", "power:2", "two-copy power:2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(UNET_SIZES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.memory_child:  # one fresh process per memory measurement on CPU
        print(json.dumps({"bytes": memory_of(args.memory_child, args)}))
        return

    print(f"device {args.device}, dtype {args.dtype}, UNet '{args.size}', batch {args.batch}, {args.steps} DDIM steps (normal sigmas), "
          f"{args.height}x{args.width}, CFG 7.5 on both models, LoRA rank 32 on to_q/k/v/out, "
          f"torch threads {torch.get_num_threads()}")
    times = time_modes(args, DTYPES[args.dtype])
    ref = times["single (plain UNet)"]
    ref_tuned = times["single (tuned: LoRA on)"]
    print("\nwall time (median of %d interleaved runs)" % args.repeats)
    print(f"{'mode':28s} {'seconds':>9s} {'/ plain':>8s} {'/ tuned':>8s}  target")
    targets = {"switch@0.75": "<= 1.05", "power:2 (batched)": "<= 2.05", "power:2 (two passes)": "<= 2.05"}
    for name, t in times.items():
        print(f"{name:28s} {t:9.3f} {t / ref:8.3f} {t / ref_tuned:8.3f}  {targets.get(name, '')}")

    mem = {}
    for mode in MEMORY_MODES:
        if args.device.startswith("cuda"):
            mem[mode] = memory_of(mode, args)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", mode] + [
                f"--{k}={v}" for k, v in (("size", args.size), ("device", args.device), ("dtype", args.dtype),
                                           ("batch", args.batch), ("steps", args.steps), ("height", args.height),
                                           ("width", args.width))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mem[mode] = json.loads(out.strip().splitlines()[-1])["bytes"]
    print("\npeak memory attributable to the run (weights + activations)")
    print(f"{'mode':28s} {'MiB':>9s} {'/ single':>9s}  target")
    for mode, b in mem.items():
        label = {"single": "single model", "power:2": "single-copy LoRA, power:2",
                 "two-copy power:2": "two copies, power:2"}[mode]
        print(f"{label:28s} {b / 2**20:9.1f} {b / mem['single']:9.3f}  {'<= 1.10' if mode == 'power:2' else ''}")


if __name__ == "__main__":
    main()
