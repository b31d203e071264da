"""Benchmark: the ComfyUI training node against the headless trainer on the same checkpoint and settings.

Run with ComfyUI's Python (the host's venv has the project's requirements too)::

    COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_PYTHON bench/bench_train_node.py [--steps 6] [--checkpoint F --config-dir D]

Without ``--checkpoint`` the tiny random-weight SD1.5 test checkpoint is written (``tests/comfy_checkpoint.py``:
a small UNet, the full-size SD VAE and CLIP-L) with a matching diffusers config directory for the headless
loader. Each front door runs in its own subprocess (so peak memory is per run): ``node`` loads the checkpoint
with ComfyUI (``comfy.sd.load_checkpoint_guess_config``) and calls ``RDTTrainRewardLoRA.train`` under
``torch.inference_mode()`` as ComfyUI's executor does; ``headless`` runs ``rdt_lib.train.run.train_from_config``
(diffusers single-file loading). Both use one config (``nodes_training.node_config``). Reported: seconds per
optimizer step (median over the steps after the first), peak memory (CUDA: max allocated; CPU: the process's
peak RSS, which includes model loading), their ratios node / headless, and the largest difference between the
two LoRA files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _settings(args) -> dict:
    return dict(objective="draft", steps=args.steps, learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, k=1,
                sampling_steps=args.sampling_steps, batch_size=args.batch_size, grad_accumulation=1, kl_coeff=0.0,
                l2_init_coeff=0.0, random_eta=False, seed=5, resolution=args.resolution, cfg=7.5,
                checkpoint_every=0, gradient_checkpointing=False)


def _config(args, output_dir: str, *, headless: bool):
    from comfy_rdt_nodes.nodes_training import RewardInput, node_config, parse_prompts

    s = _settings(args)
    rewards = [RewardInput(type("H", (), {"name": args.reward})(), 1.0, args.reward)]
    config = node_config(prompts=parse_prompts(args.prompts), rewards=rewards, name="bench", output_dir=output_dir,
                         base_name=args.checkpoint, resume=False, family="sd15", **s)
    if headless:
        config = config.model_copy(update={
            "model": config.model.model_copy(update={"single_file_config": args.config_dir}),
            "rewards": [config.rewards[0].model_copy(update={"path": args.reward_path})]})
    return config


def _peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def run_node(args) -> dict:
    import torch

    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    if not torch.cuda.is_available():
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
    import comfy.sd
    import comfy.utils
    import folder_paths

    work = Path(args.work)
    folder_paths.add_model_folder_path("loras", str(work / "models" / "loras"), is_default=True)
    folder_paths.add_model_folder_path("rewards", str(work / "models" / "rewards"), is_default=True)
    folder_paths.set_output_directory(str(work / "output_node"))
    from comfy_rdt_nodes.nodes_reward import RDTRewardModelLoader
    from comfy_rdt_nodes.nodes_training import RDTTrainRewardLoRA

    times: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: times.append(
        time.perf_counter()))
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True,
                                                                 output_clip=True)[:3]
        reward = RDTRewardModelLoader().load(args.reward, Path(args.reward_path).name + "/", "fp32",
                                             folders=[Path(args.reward_path).parent])[0]
        start = time.perf_counter()
        out = RDTTrainRewardLoRA().train(model=model, clip=clip, vae=vae, reward_model=reward, reward_weight=1.0,
                                         prompts=args.prompts, lora_name="bench", if_exists="overwrite",
                                         **_settings(args))
    total = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lora = work / "models" / "loras" / out["result"][1]
    return {"front": "node", "step_times": _diffs([start] + times), "total_s": total,
            "peak_mib": _peak_memory(device), "lora": str(lora)}


def run_headless(args) -> dict:
    import torch

    from rdt_lib.train.run import train_from_config

    out_dir = str(Path(args.work) / "output_headless")
    config = _config(args, out_dir, headless=True)
    times: list[float] = []
    start = time.perf_counter()
    result = train_from_config(config, log=lambda m: None, step_callback=lambda s, m: times.append(time.perf_counter()))
    total = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"front": "headless", "step_times": _diffs([start] + times), "total_s": total,
            "peak_mib": _peak_memory(device), "lora": str(result.lora_path)}


def _diffs(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _prepare(args) -> None:
    work = Path(args.work)
    (work / "models" / "loras").mkdir(parents=True, exist_ok=True)
    if not args.checkpoint:
        import comfy_checkpoint

        args.checkpoint = str(comfy_checkpoint.write_tiny_sd15_checkpoint(work / "models" / "checkpoints" /
                                                                           "rdt_tiny_sd15.safetensors"))
    if not args.config_dir:
        import comfy_train_fixtures

        args.config_dir = str(comfy_train_fixtures.write_tiny_sd15_config_dir(work / "sd15_config",
                                                                             os.environ["COMFYUI_DIR"]))
    if not args.reward_path:
        import reward_fixtures

        args.reward_path = str(reward_fixtures.make_tiny_reward(args.reward, work / "models" / "rewards"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--prompts", default="a photo of a cat\na red house")
    p.add_argument("--reward", default="aesthetic")
    p.add_argument("--reward-path", default="")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--config-dir", default="")
    p.add_argument("--work", default="")
    p.add_argument("--mode", choices=("both", "node", "headless"), default="both")
    args = p.parse_args()
    if args.mode != "both":
        result = run_node(args) if args.mode == "node" else run_headless(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if "COMFYUI_DIR" not in os.environ:
        sys.exit("set COMFYUI_DIR to a ComfyUI tree (and run with its Python)")
    with tempfile.TemporaryDirectory(prefix="rdt-bench-") as tmp:
        args.work = args.work or tmp
        _prepare(args)
        results = {}
        for mode in ("node", "headless"):
            cmd = [sys.executable, __file__, "--mode", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{mode} run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            results[mode] = json.loads(line[0][len("RESULT "):])
        from rdt_lib.lora_io import load_lora_safetensors

        a, meta_a = load_lora_safetensors(results["node"]["lora"])
        b, meta_b = load_lora_safetensors(results["headless"]["lora"])
        assert set(a) == set(b), "the two LoRA files have different keys"
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        scale = max(float(b[k].float().abs().max()) for k in b if k.endswith("lora_up.weight"))
        print(f"settings: {json.dumps(_settings(args))}, checkpoint {Path(args.checkpoint).name}")
        rows = {}
        for mode, r in results.items():
            steady = r["step_times"][1:] or r["step_times"]
            rows[mode] = statistics.median(steady)
            print(f"{mode:9s} s/step {rows[mode]:.3f} (first {r['step_times'][0]:.3f})  peak {r['peak_mib']:.0f} MiB"
                  f"  total {r['total_s']:.1f} s")
        print(f"ratio node/headless: s/step {rows['node'] / rows['headless']:.3f}, peak memory "
              f"{results['node']['peak_mib'] / results['headless']['peak_mib']:.3f}")
        print(f"LoRA files: max |node - headless| = {diff:.3g} (largest |lora_up| {scale:.3g}); steps "
              f"{meta_a.get('rdt_steps')} / {meta_b.get('rdt_steps')}")


if __name__ == "__main__":
    main()
