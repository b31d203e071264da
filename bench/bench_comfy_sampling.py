"""Dual-model sampling in a real ComfyUI against ComfyUI's own ways, side by side in one server run.

Starts ``main.py --cpu`` (the host of ``COMFYUI_DIR`` / ``COMFYUI_PYTHON``, as the tests do) with this pack, a
random-weight checkpoint with the full SD1.5 UNet (the real architecture, 860M parameters; a small VAE / CLIP
are not involved in the timing) and a rank-16 kohya LoRA on every attention / feed-forward layer of the UNet,
then runs, interleaved over ``--repeats`` rounds (a new seed each round, so ComfyUI's cache never skips the
sampler):

- ``ksampler``: stock KSampler on the base model (the reference of every ratio);
- ``ksampler_lora``: stock KSampler on base + LoRA (LoraLoaderModelOnly);
- ``chain``: the stock two-KSamplerAdvanced chain, base for the first 75% of the steps, base + LoRA after;
- ``hook_switch``: the stock LoRA-hook way (CreateHookLoraModelOnly, keyframes 0 -> 1 at 75%, on the conds);
- ``dual_switch``: RDTDualModelKSampler, base + LoRA, ``switch@0.75``;
- ``dual_power2``: RDTDualModelKSampler, base + LoRA, ``power:2`` (both models at most steps: one batched
  forward pass; the floor of two separate evaluations would be 2.0x).

Printed: median wall time of each prompt (from ComfyUI's execution_start / execution_success timestamps) and
peak resident memory of the server process during it (sampled every 10 ms from /proc), each as a ratio to
``ksampler``. Targets (issue 10): dual_switch <= 1.02x time and faster than chain; dual_power2 <= 1.7x time
and <= 1.10x peak memory.

    eval "$(bash scripts/comfyui_host.sh)"
    python bench/bench_comfy_sampling.py --size 256 --steps 8 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

CKPT = "rdt_bench_sd15_full.safetensors"
LORA = "rdt_bench_lora_r16.safetensors"
SD15_FULL_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                      norm_num_groups=32)


def write_checkpoint(path: Path) -> None:
    """Full SD1.5 UNet (random, float16 on disk) + the test VAE / CLIP-L (random)."""
    import ldm_checkpoint as ldm
    from comfy_checkpoint import CLIP_L, SD_VAE
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_FULL_UNET).eval()
    sd = {ldm.UNET_PREFIX + k: v.half() for k, v in ldm.unet_to_ldm(unet.state_dict(), unet.config).items()}
    del unet
    vae = AutoencoderKL(**SD_VAE).eval()
    sd.update({ldm.VAE_PREFIX + k: v.half() for k, v in ldm.vae_to_ldm(vae.state_dict(), vae.config).items()})
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    sd.update({k: v.half() for k, v in ldm.clip_to_ldm(text.state_dict(), ldm.SD15_CLIP_PREFIX).items()})
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(path)


def write_lora(path: Path, rank: int = 16) -> None:
    from diffusers import UNet2DConditionModel

    from rdt_lib.lora_io import save_lora_safetensors

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_FULL_UNET)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in name and ("attn" in name or ".ff." in name):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.02
            tensors[key + ".alpha"] = torch.tensor(float(rank))
    save_lora_safetensors(path, tensors)


class RssSampler:
    """Peak VmRSS (bytes) of a process, sampled in a thread while active."""

    def __init__(self, pid: int, period: float = 0.01) -> None:
        self.pid, self.period = pid, period
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.peak = self._rss()
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(self.period)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def graphs(size: int, steps: int, seed: int) -> dict[str, dict]:
    from comfy_graphs import Graph, base_pipeline, dual, ksampler, lora_model, save

    k = int(round(0.75 * steps))
    cfg = 7.5
    out = {}

    def fresh():
        g = Graph()
        p = base_pipeline(g, ckpt=CKPT, size=size)
        return g, p

    g, p = fresh()
    save(g, ksampler(g, p, p["model"], seed=seed, steps=steps, cfg=cfg, sampler="euler"), "b_ks")
    out["ksampler"] = g.nodes
    g, p = fresh()
    save(g, ksampler(g, p, lora_model(g, p["model"], LORA), seed=seed, steps=steps, cfg=cfg, sampler="euler"), "b_ksl")
    out["ksampler_lora"] = g.nodes
    g, p = fresh()
    first = g.add("KSamplerAdvanced", model=p["model"], add_noise="enable", noise_seed=seed, steps=steps, cfg=cfg,
                  sampler_name="euler", scheduler="normal", positive=p["positive"], negative=p["negative"],
                  latent_image=p["latent"], start_at_step=0, end_at_step=k, return_with_leftover_noise="enable")
    second = g.add("KSamplerAdvanced", model=lora_model(g, p["model"], LORA), add_noise="disable", noise_seed=seed,
                   steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", positive=p["positive"],
                   negative=p["negative"], latent_image=[first, 0], start_at_step=k, end_at_step=10000,
                   return_with_leftover_noise="disable")
    save(g, [second, 0], "b_chain")
    out["chain"] = g.nodes
    g, p = fresh()
    hook = g.add("CreateHookLoraModelOnly", lora_name=LORA, strength_model=1.0)
    kf0 = g.add("CreateHookKeyframe", strength_mult=0.0, start_percent=0.0)
    kf1 = g.add("CreateHookKeyframe", strength_mult=1.0, start_percent=0.75, prev_hook_kf=[kf0, 0])
    hooks = g.add("SetHookKeyframes", hooks=[hook, 0], hook_kf=[kf1, 0])
    conds = g.add("PairConditioningSetProperties", positive_NEW=p["positive"], negative_NEW=p["negative"],
                  strength=1.0, set_cond_area="default", hooks=[hooks, 0])
    hp = dict(p, positive=[conds, 0], negative=[conds, 1])
    save(g, ksampler(g, hp, p["model"], seed=seed, steps=steps, cfg=cfg, sampler="euler"), "b_hook")
    out["hook_switch"] = g.nodes
    for name, spec in (("dual_switch", "switch@0.75"), ("dual_power2", "power:2")):
        g, p = fresh()
        save(g, dual(g, p, p["model"], lora_model(g, p["model"], LORA), seed=seed, steps=steps, cfg_base=cfg,
                     cfg_tuned=cfg, sampler="euler", schedule=spec), f"b_{name}")
        out[name] = g.nodes
    return out


def exec_seconds(entry: dict) -> float:
    msgs = {event: data for event, data in entry["status"]["messages"]}
    return (msgs["execution_success"]["timestamp"] - msgs["execution_start"]["timestamp"]) / 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rdt" / "bench")
    args = ap.parse_args(argv)

    import comfyui_server as cs

    tree = cs.comfyui_dir()
    if tree is None:
        print(cs.HOST_HINT, file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt_cache = args.cache / CKPT
    if not ckpt_cache.exists():
        print("writing the random full-SD1.5 checkpoint (once) ...", flush=True)
        write_checkpoint(ckpt_cache)
    with tempfile.TemporaryDirectory(prefix="rdt_bench_comfy_") as base:
        base = Path(base)
        server = cs.ComfyServer(tree, cs.comfyui_python(tree), base, threads=args.threads)
        (server.models_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (server.models_dir / "loras").mkdir(parents=True, exist_ok=True)
        (server.models_dir / "checkpoints" / CKPT).symlink_to(ckpt_cache)
        write_lora(server.models_dir / "loras" / LORA)
        server.start(timeout=600)
        try:
            print(f"ComfyUI {server.version}, SD1.5 UNet (random), {args.size}x{args.size}, {args.steps} euler steps, "
                  f"{args.threads} threads, {args.repeats} rounds", flush=True)
            warm = graphs(args.size, 2, seed=10_000)
            for name, graph in warm.items():  # load every model / LoRA once, outside the measurement
                server.run(graph, timeout=3600)
            times: dict[str, list[float]] = {}
            peaks: dict[str, list[int]] = {}
            for r in range(args.repeats):
                for name, graph in graphs(args.size, args.steps, seed=r).items():
                    with RssSampler(server.proc.pid) as rss:
                        entry = server.run(graph, timeout=3600)
                    times.setdefault(name, []).append(exec_seconds(entry))
                    peaks.setdefault(name, []).append(rss.peak)
                    print(f"  round {r} {name:14s} {times[name][-1]:7.2f} s  peak RSS {rss.peak / 2**30:6.2f} GiB",
                          flush=True)
        finally:
            server.stop()
    t0 = statistics.median(times["ksampler"])
    m0 = max(peaks["ksampler"])
    print(f"\n{'config':14s} {'median s':>9s} {'time x':>7s} {'peak GiB':>9s} {'mem x':>6s}")
    for name in times:
        t, m = statistics.median(times[name]), max(peaks[name])
        print(f"{name:14s} {t:9.2f} {t / t0:7.3f} {m / 2**30:9.2f} {m / m0:6.3f}")
    print("\ntargets: dual_switch time x <= 1.02 and < chain; dual_power2 time x <= 1.7 (two-pass floor 2.0), "
          "mem x <= 1.10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
