"""The embedded demo: the reward-diversity trade-off on a 2-D toy, end to end, in about a minute on a CPU.

1. Train a small diffusion model on 8 Gaussian modes on a circle (the "base model").
2. Fine-tune a LoRA on it with DRaFT-K against a reward that favours the right half of the plane
   (reward = bump at mode 0, so mode 0 at (+radius, 0) scores 1, the leftmost mode -1).
3. Sample with ``base``, ``tuned``, combined generation (``switch@F``), AIG (``power:P``) and the
   LoRA-scaling baseline, and measure mean reward, mode coverage / entropy and the share of samples
   off the data distribution.
4. Write a figure (one scatter per method and a reward-vs-diversity plot) and a markdown table.

Run: ``python -m rdt_lib.demo [--out DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic_io import write_bytes_atomic, write_text_atomic
from .backbones.toy2d import TOY_LORA_TARGETS, GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base
from .denoisers import ModelBranch
from .evaluation.mode_coverage import mode_statistics
from .lora import add_lora
from .objectives.draft import DraftK
from .sampling import sample
from .train.trainer import RewardTrainer, TrainerSettings

# "simple": every (1000 / steps)-th training sigma from the top (diffusers' "trailing" spacing). The last step starts
# at a real noise level (t = 1000 / steps - 1), so DRaFT-1's one gradient step can move the samples; "normal" and
# "ddim_uniform" spend their last step at t <= 1, where the model barely changes anything.
SIGMAS = "simple"

__all__ = ["DemoConfig", "run_demo", "main"]


@dataclass
class DemoConfig:
    """Settings of the demo (defaults: about a minute on 2 CPU cores)."""

    out: str = "outputs/demo"
    seed: int = 0
    base_steps: int = 6000
    base_batch: int = 512
    lora_rank: int = 8
    draft_steps: int = 60
    draft_k: int = 25  # = sample_steps: gradient through the whole trajectory
    draft_batch: int = 128
    draft_lr: float = 3e-4
    sample_steps: int = 25
    n_samples: int = 2000
    switch_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    powers: tuple[float, ...] = (1.0, 2.0, 4.0)
    lora_scales: tuple[float, ...] = (0.25, 0.5)


def toy_reward(mixture: GaussianMixture2D):
    """The demo's reward: a wide bump ``exp(-|x - c|^2 / (2 radius^2))`` centred on mode 0, ``c = (radius, 0)``.

    On the modes it is ``exp(cos(angle) - 1)``: 1 for mode 0, 0.75 for its neighbours, 0.37 at 90 degrees,
    0.14 for the opposite mode; its gradient points at ``c`` from everywhere, so points between modes
    are pulled off the data too.
    """
    center = mixture.centers[0]

    def reward(points: torch.Tensor, prompts) -> torch.Tensor:
        d2 = ((points - center.to(points)) ** 2).sum(dim=1)
        return torch.exp(-d2 / (2 * mixture.radius**2))

    return reward


def _methods(cfg: DemoConfig) -> list[tuple[str, str, float]]:
    """(label, schedule spec, LoRA scale) for every sampling method compared."""
    methods = [("base", "base", 1.0), ("tuned", "tuned", 1.0)]
    methods += [(f"switch@{f:g}", f"switch@{f:g}", 1.0) for f in cfg.switch_fractions]
    methods += [("linear" if p == 1 else f"power:{p:g}", "linear" if p == 1 else f"power:{p:g}", 1.0) for p in cfg.powers]
    methods += [(f"LoRA scale {s:g}", "tuned", s) for s in cfg.lora_scales]
    return methods


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print) -> dict:
    """Run the whole demo; returns the results table (list of dicts) and the output paths."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    mixture = GaussianMixture2D()
    reward = toy_reward(mixture)

    log(f"[1/4] training the base model: {cfg.base_steps} steps on {mixture.n_modes} Gaussian modes")
    backbone = ToyBackbone(ToyDenoiser())
    train_toy_base(backbone, mixture, steps=cfg.base_steps, batch_size=cfg.base_batch, seed=cfg.seed, progress=progress)

    log(f"[2/4] DRaFT-{cfg.draft_k} LoRA fine-tuning (rank {cfg.lora_rank}) for {cfg.draft_steps} steps, "
        f"reward = bump at mode 0")
    add_lora(backbone.network, "tuned", rank=cfg.lora_rank, target_modules=TOY_LORA_TARGETS)
    trainer = RewardTrainer(
        backbone,
        DraftK(num_steps=cfg.sample_steps, k=cfg.draft_k, adapter="tuned", sampler="ddim", scheduler=SIGMAS),
        reward,
        [""],
        settings=TrainerSettings(lr=cfg.draft_lr, batch_size=cfg.draft_batch, grad_clip=10.0, weight_decay=0.0,
                                 seed=cfg.seed),
    )
    history = trainer.train(cfg.draft_steps, progress=progress)
    first = sum(h["reward"] for h in history[:10]) / min(10, len(history))
    last = sum(h["reward"] for h in history[-10:]) / min(10, len(history))
    log(f"      training reward: {first:.3f} (first 10 steps) -> {last:.3f} (last 10 steps)")

    log(f"[3/4] sampling {cfg.n_samples} points per method ({cfg.sample_steps} DDIM steps)")
    results = []
    points = {}
    prompts = [""] * cfg.n_samples
    for label, spec, scale in _methods(cfg):
        tuned = ModelBranch(backbone, adapter="tuned", lora_scale=scale)
        res = sample(backbone, prompts, tuned=tuned, schedule=spec, num_steps=cfg.sample_steps, scheduler=SIGMAS,
                     seeds=10_000 * (cfg.seed + 1))
        pts = res.images
        stats = mode_statistics(pts, mixture)
        points[label] = pts
        results.append({
            "method": label,
            "mean_reward": float(reward(pts, prompts).mean()),
            "modes_covered": stats.modes_covered,
            "mode_entropy": stats.mode_entropy,
            "off_distribution": stats.off_distribution,
        })

    log("[4/4] writing the figure and the table")
    fig_path = out / "tradeoff.png"
    table_path = out / "results.md"
    _write_figure(fig_path, points, results, mixture)
    write_text_atomic(table_path, _markdown_table(results, cfg, first, last, time.perf_counter() - t_start))
    write_text_atomic(out / "results.json", json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    log(_markdown_table(results, cfg, first, last, time.perf_counter() - t_start, header=False))
    log(f"figure: {fig_path.resolve()}")
    log(f"table:  {table_path.resolve()}")
    return {"results": results, "figure": str(fig_path), "table": str(table_path), "history": history}


def _markdown_table(results, cfg: DemoConfig, first: float, last: float, seconds: float, header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "# rdt demo: reward vs diversity on a 2-D toy",
            "",
            f"Base model: 8 Gaussian modes on a circle. Reward: exp(-|x - mode 0|^2 / (2 radius^2)). DRaFT-{cfg.draft_k} LoRA (rank "
            f"{cfg.lora_rank}), {cfg.draft_steps} steps; training reward {first:.3f} -> {last:.3f}. "
            f"{cfg.n_samples} samples per method, {cfg.sample_steps} DDIM steps. Run time {seconds:.0f} s.",
            "",
            "Modes covered: modes with >= 2% of the on-distribution samples (of 8). Mode entropy: 1 = all modes "
            "equally used, 0 = one mode. Off-distribution: farther than 3 std from every mode centre.",
            "",
        ]
    lines += [
        "| method | mean reward | modes covered | mode entropy | off-distribution |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['mean_reward']:.3f} | {r['modes_covered']} | {r['mode_entropy']:.3f} | "
            f"{100 * r['off_distribution']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def _write_figure(path: Path, points: dict, results: list, mixture: GaussianMixture2D) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(points)
    cols = 4
    rows = (n + cols - 1) // cols + 1
    fig = plt.figure(figsize=(4 * cols, 4 * rows))
    centers = mixture.centers
    lim = mixture.radius * 1.8
    for k, (label, pts) in enumerate(points.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        p = pts.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.4)
        ax.scatter(centers[:, 0], centers[:, 1], marker="x", color="black", s=30)
        r = next(r for r in results if r["method"] == label)
        ax.set_title(f"{label}\nreward {r['mean_reward']:.2f}, entropy {r['mode_entropy']:.2f}, "
                     f"off {100 * r['off_distribution']:.0f}%", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    ax = fig.add_subplot(rows, 1, rows)
    for r in results:
        ax.scatter(r["mode_entropy"], r["mean_reward"], s=40 + 400 * r["off_distribution"])
        ax.annotate(r["method"], (r["mode_entropy"], r["mean_reward"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("mode entropy (diversity, 1 = all 8 modes equally)")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs diversity (marker size: off-distribution share)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdt_lib.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DemoConfig.out, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, rough numbers (for smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = DemoConfig(out=args.out, seed=args.seed)
    # The toy network is tiny: one thread is faster than several fighting over a busy machine.
    torch.set_num_threads(1)
    if args.quick:
        cfg.base_steps, cfg.draft_steps, cfg.n_samples, cfg.draft_batch = 300, 10, 300, 32
    try:
        run_demo(cfg, progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
