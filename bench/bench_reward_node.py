"""The Reward Scorer node's cost over ``RewardModel.score``, and peak memory of sampling-then-scoring with and without
the offload between the two phases. Everything is measured side by side in one run.

1. Throughput: images/second of ``RDTRewardScorer.score`` (ComfyUI IMAGE ``[B, H, W, C]`` in, prompt split,
   validation, channel permute, scoring, sorting, top-k, table) against ``reward.score`` on the same images in
   ``[B, 3, H, W]``, interleaved (A B A B ...), medians compared. The reward is the real architecture with random
   weights (``--reward``; default clipscore: CLIP ViT-L/14), or the tiny one (``--tiny``).
2. Peak memory of one best-of-N step in a fresh subprocess per mode: an SD-layout UNet (random weights, as
   bench_sampling's ``--unet`` sizes) denoises a batch, then the reward scores images through the node.
   - ``resident``: both networks stay loaded through both phases (a node pack that keeps its reward on the
     device forever);
   - ``offloaded``: each network is on the compute device only in its phase (what ComfyUI's model management does
     with the ``ModelPatcher``-wrapped reward: ``load_models_gpu`` loads it for scoring and offloads it when the
     sampler needs the memory). On a CPU-only machine the offload target is the same RAM, so the bench emulates the
     offload by releasing the other phase's network; the number is the compute device's share on a GPU machine.
   CPU: peak resident set size minus the size before the first network was built. CUDA: max_memory_allocated.

    python bench/bench_reward_node.py                     # clipscore ViT-L/14, small UNet, CPU
    python bench/bench_reward_node.py --tiny --repeats 20 # quick
    python bench/bench_reward_node.py --device cuda --unet sd15 --reward hpsv2.1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import reward_fixtures as fx  # noqa: E402
from comfy_rdt_nodes.nodes_reward import RDTRewardScorer, RewardHandle  # noqa: E402


def build_reward(name: str, tiny: bool, device: str):
    from bench_rewards import build

    with tempfile.TemporaryDirectory() as tmp:
        reward, _ = build(name, tiny, Path(tmp))
    return reward.place(torch.device(device), torch.float32)


def handle_for(reward) -> RewardHandle:
    return RewardHandle(name=reward.name, reward=reward, weights="bench", dtype=reward.dtype,
                        load_device=reward.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(args) -> dict:
    reward = build_reward(args.reward, args.tiny, args.device)
    handle = handle_for(reward)
    bchw = fx.natural_batch(args.batch, args.height, args.width, seed=1).to(args.device)
    bhwc = bchw.permute(0, 2, 3, 1).contiguous()
    prompts = [fx.PROMPTS[i % len(fx.PROMPTS)] for i in range(args.batch)]
    prompt_text = "\n".join(prompts)
    node = RDTRewardScorer()

    def direct():
        return reward.score(bchw, prompts if reward.needs_prompts else None)

    def via_node():
        return node.score(bhwc, prompt_text, handle, top_k=min(2, args.batch))

    with torch.no_grad():
        a, b = direct(), torch.tensor(via_node()["result"][0])  # warm-up, and the same scores both ways
        assert torch.allclose(a.float().cpu(), b, atol=1e-4), (a, b)
        times = {"direct": [], "node": []}
        for _ in range(args.repeats):
            for label, fn in (("direct", direct), ("node", via_node)):
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(params_m=sum(p.numel() for p in reward.parameters()) / 1e6,
                direct_ips=args.batch / med["direct"], node_ips=args.batch / med["node"],
                overhead_ms=1000 * (med["node"] - med["direct"]))


# ---- memory (one subprocess per mode) ---------------------------------------------------------------------------
def _memory_child(mode: str, args) -> float:
    from bench_sampling import UNetOnlyBackbone, _PeakRss, _rss_bytes, build as build_unet

    from rdt_lib.sampling import sample

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        peak = _PeakRss()
    with torch.no_grad():
        bb = build_unet(args.unet, args.device, torch.float32, lora=False)
        assert isinstance(bb, UNetOnlyBackbone)
        reward = build_reward(args.reward, args.tiny, args.device) if mode == "resident" else None
        sample(bb, ["p"] * args.batch, num_steps=args.steps, height=args.height, width=args.width, decode=False,
               seeds=0)
        if mode == "offloaded":
            del bb  # offloaded from the compute device before scoring
            gc.collect()
            reward = build_reward(args.reward, args.tiny, args.device)  # loaded onto it for scoring
        images = fx.natural_batch(args.batch, args.height, args.width, seed=2).permute(0, 2, 3, 1).to(args.device)
        RDTRewardScorer().score(images, "a photo of a cat", handle_for(reward), top_k=1)
    sync(args.device)
    if cuda:
        return float(torch.cuda.max_memory_allocated() - base)
    return float(peak.stop() - base)


def memory(mode: str, args) -> float:
    cmd = [sys.executable, __file__, "--child", mode] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "tiny", "skip_memory")]
    if args.tiny:
        cmd.append("--tiny")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="clipscore")
    parser.add_argument("--tiny", action="store_true", help="tiny reward architecture (quick run)")
    parser.add_argument("--unet", default="small", choices=["small", "sd15"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", dest="skip_memory", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if args.child:
        print(json.dumps({"peak": _memory_child(args.child, args)}))
        return
    arch = "tiny" if args.tiny else "real"
    print(f"reward {args.reward} ({arch} architecture, random weights), batch {args.batch} at "
          f"{args.height}x{args.width}, {args.device}, {torch.get_num_threads()} threads")
    t = throughput(args)
    print(f"throughput ({t['params_m']:.1f}M parameters, median of {args.repeats}):")
    print(f"  RewardModel.score     {t['direct_ips']:8.2f} images/s")
    print(f"  RDTRewardScorer node  {t['node_ips']:8.2f} images/s   ratio node/direct "
          f"{t['node_ips'] / t['direct_ips']:.3f}  (overhead {t['overhead_ms']:+.1f} ms per batch)")
    if args.skip_memory:
        return
    res, off = memory("resident", args), memory("offloaded", args)
    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"peak memory of sample ({args.unet} UNet, {args.steps} steps) then score ({unit}):")
    print(f"  both resident          {res / 2**20:9.1f} MiB")
    print(f"  offloaded between      {off / 2**20:9.1f} MiB   ratio offloaded/resident {off / res:.3f}")


if __name__ == "__main__":
    main()
