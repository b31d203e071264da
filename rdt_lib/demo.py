"""The embedded demo: the papers' mechanism on a 2-D toy, end to end, in about a minute on a CPU.

The papers (ImageReFL, AIG) argue: the early sampling steps decide an image's global structure, the late steps
its detail; a reward-tuned model collapses the structure (diversity) while it gains reward; so running the base
model early and the tuned model late (combined generation ``switch@F``, AIG ``linear`` / ``power:P``) should
keep the base model's structure and still gain the reward that lives in the detail. The toy has both scales:

1. Data: 8 narrow Gaussian modes on a circle. The base model is a trained MLP that fits them (few samples off
   the data), distilled from the mixture's closed-form optimal denoiser (:func:`train_toy_base`, ``exact``).
2. Reward = a global part (which mode: ``(1 + cos angle) / 2``, 1 at mode 0, 0 at the opposite mode) + a local
   part (where inside a mode: a bump at a "sweet spot" one std outward from each mode's centre, standing in
   for fine detail). A LoRA is tuned on it with DRaFT-K through the whole sampling chain (the project's
   trainer, :class:`~rdt_lib.train.trainer.RewardTrainer`).
3. Sampling with ``base``, ``tuned``, combined generation, AIG and LoRA scaling (:func:`rdt_lib.sampling.sample`),
   measured with the sweep's metrics (:mod:`rdt_lib.evaluation`): both reward parts, mode coverage / entropy,
   off-distribution share, cosine diversity and Vendi score of a fixed random-Fourier feature map (the toy's
   stand-in for DINO embeddings), spectral distance of those features to a fresh set of base samples, and the
   Pareto front of diversity vs reward.
4. Outputs: ``tradeoff.png`` (a scatter per method), ``pareto.png`` (reward vs diversity, one panel per reward
   part), ``results.md`` and ``results.json``.

Run: ``python -m rdt_lib.demo [--out DIR] [--seed N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .atomic_io import write_text_atomic
from .backbones.toy2d import TOY_LORA_TARGETS, GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base
from .denoisers import ModelBranch
from .evaluation import (
    mode_statistics,
    pairwise_cosine_diversity,
    pareto_figure,
    pareto_front,
    save_figure,
    spectral_distance,
    vendi_score,
)
from .lora import add_lora
from .objectives.draft import DraftK
from .sampling import sample
from .train.trainer import RewardTrainer, TrainerSettings

# Karras sigmas: log-spaced toward sigma_min, so the last steps resolve the narrow modes (with the exact optimal
# denoiser, 25 steps leave 2.3% of the samples off the data with "karras" and 17% with "simple" / "normal").
SIGMAS = "karras"
SAMPLER = "ddim"

__all__ = ["DemoConfig", "ToyReward", "toy_features", "train_base", "sample_points", "measure", "run_demo", "main"]


@dataclass
class DemoConfig:
    """Settings of the demo (defaults: about a minute on 2 CPU cores)."""

    out: str = "outputs/demo"
    seed: int = 0
    base_steps: int = 4000
    base_batch: int = 512
    base_hidden: int = 96
    base_lr: float = 3e-3
    lora_rank: int = 8
    draft_steps: int = 150
    draft_k: int = 1  # gradient through the last sampling step only, as in the AIG paper's DRaFT-1 runs
    draft_batch: int = 128
    draft_lr: float = 3e-3
    sample_steps: int = 25
    n_samples: int = 2000
    local_weight: float = 1.0
    switch_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    powers: tuple[float, ...] = (1.0, 2.0, 4.0)
    lora_scales: tuple[float, ...] = (0.25, 0.5)


class ToyReward:
    """The demo's reward ``global + local_weight * local`` on points ``[B, 2]`` (data units), differentiable.

    - global (which mode), in [0, 1]: ``(1 + cos(angle)) / 2`` with ``angle`` the polar angle of the point;
      1 on mode 0 (angle 0), 0.85 on its neighbours, 0.5 at 90 degrees, 0 on the opposite mode. Nearly
      constant inside one mode (a mode spans about 0.06 rad).
    - local (where inside the mode), in [0, 1]: ``exp(-|x - s_k|^2 / (2 std^2))`` with ``k`` the nearest mode and
      ``s_k`` its sweet spot, one std radially outward from the centre. Samples spread like the data score
      0.39 on average (``0.5 exp(-1/4)``), samples all at their mode's sweet spot 1.
    """

    def __init__(self, mixture: GaussianMixture2D, local_weight: float = 1.0) -> None:
        self.mixture = mixture
        self.local_weight = float(local_weight)
        centers = mixture.centers
        self.sweet_spots = centers * (1.0 + mixture.std / mixture.radius)

    def parts(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B], local [B])`` of ``points [B, 2]``."""
        angle = torch.atan2(points[:, 1], points[:, 0])
        glob = 0.5 * (1.0 + torch.cos(angle))
        centers = self.mixture.centers.to(points)
        nearest = torch.cdist(points.detach(), centers).argmin(dim=1)
        d2 = ((points - self.sweet_spots.to(points)[nearest]) ** 2).sum(dim=1)
        local = torch.exp(-d2 / (2 * self.mixture.std ** 2))
        return glob, local

    def __call__(self, points: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        glob, local = self.parts(points)
        return glob + self.local_weight * local


def toy_features(points: torch.Tensor, *, dim: int = 256, bandwidth: float = 0.5, seed: int = 1234) -> torch.Tensor:
    """A fixed random-Fourier feature map of 2-D points (data units) -> ``[B, dim]``, the toy's stand-in for DINO.

    ``phi(x) = sqrt(2 / dim) cos(W x + b)`` with ``W ~ N(0, I / bandwidth^2)``, ``b ~ U(0, 2 pi)`` drawn from
    ``seed``: the cosine similarity of two feature vectors approximates the Gaussian kernel
    ``exp(-|x - y|^2 / (2 bandwidth^2))``, so points in different modes (3 data units apart) are near-orthogonal
    and points of one mode similar (0.6 for two draws of the data's spread, 1 for coinciding points): the
    diversity metrics see both which mode and where inside it.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, dim, generator=gen, dtype=torch.float64) / bandwidth
    b = torch.rand(dim, generator=gen, dtype=torch.float64) * 2 * math.pi
    return math.sqrt(2.0 / dim) * torch.cos(points.detach().double().cpu() @ w + b)


def train_base(cfg: DemoConfig, mixture: GaussianMixture2D, *,
               progress: bool = False) -> tuple[ToyBackbone, list[float]]:
    """The demo's base model: a :class:`ToyDenoiser` (input in data units) trained on ``mixture`` with the exact
    denoiser as target; returns the backbone and the loss per step."""
    backbone = ToyBackbone(ToyDenoiser(hidden=cfg.base_hidden, input_scale=4.0), data_scale=4.0)
    losses = train_toy_base(backbone, mixture, steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr,
                            seed=cfg.seed, progress=progress, target="exact")
    return backbone, losses


def sample_points(backbone: ToyBackbone, cfg: DemoConfig, n: int, *, schedule: str = "base", lora_scale: float = 1.0,
                  seed: int = 0) -> torch.Tensor:
    """``n`` points ``[n, 2]`` (data units) sampled as the demo samples (``SAMPLER`` on ``SIGMAS``, ``sample_steps``),
    the tuned model being the LoRA adapter ``"tuned"`` (where one exists) at ``lora_scale``; seeds ``seed .. + n``."""
    tuned = ModelBranch(backbone, adapter="tuned", lora_scale=lora_scale) if schedule != "base" else None
    with torch.no_grad():
        res = sample(backbone, [""] * n, tuned=tuned, schedule=schedule, sampler=SAMPLER, scheduler=SIGMAS,
                     num_steps=cfg.sample_steps, seeds=seed)
    return res.images


def _methods(cfg: DemoConfig) -> list[tuple[str, str, float]]:
    """(label, schedule spec, LoRA scale) for every sampling method compared."""
    methods = [("base", "base", 1.0), ("tuned", "tuned", 1.0)]
    methods += [(f"switch@{f:g}", f"switch@{f:g}", 1.0) for f in cfg.switch_fractions]
    aig = ["linear" if p == 1 else f"power:{p:g}" for p in cfg.powers]
    methods += [(spec, spec, 1.0) for spec in aig]
    methods += [(f"LoRA scale {s:g}", "tuned", s) for s in cfg.lora_scales]
    return methods


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std())


def measure(points: torch.Tensor, reward: ToyReward, reference_features: torch.Tensor) -> dict[str, Any]:
    """Every metric of one method's samples ``points [N, 2]`` (see the module docstring)."""
    with torch.no_grad():
        glob, local = reward.parts(points)
        total = glob + reward.local_weight * local
    stats = mode_statistics(points, reward.mixture)
    feats = toy_features(points)
    r_mean, r_std = _mean_std(total)
    g_mean, g_std = _mean_std(glob)
    l_mean, l_std = _mean_std(local)
    return {
        "reward": r_mean, "reward_std": r_std,
        "reward_global": g_mean, "reward_global_std": g_std,
        "reward_local": l_mean, "reward_local_std": l_std,
        "modes_covered": stats.modes_covered,
        "mode_entropy": stats.mode_entropy,
        "off_distribution": stats.off_distribution,
        "diversity": pairwise_cosine_diversity(feats),
        "vendi": vendi_score(feats),
        "spectral_distance": spectral_distance(reference_features, feats),
        "spectral_distance_log10": spectral_distance(reference_features, feats, log10=True),
    }


def run_demo(cfg: DemoConfig, *, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Run the whole demo; returns the results rows, the training history, the base loss and the output paths."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    mixture = GaussianMixture2D()
    reward = ToyReward(mixture, cfg.local_weight)

    log(f"[1/4] training the base model: {cfg.base_steps} steps on {mixture.n_modes} Gaussian modes "
        "(target: the mixture's exact denoiser)")
    backbone, base_losses = train_base(cfg, mixture, progress=progress)
    t_base = time.perf_counter() - t_start

    log(f"[2/4] DRaFT-{cfg.draft_k} LoRA fine-tuning (rank {cfg.lora_rank}) for {cfg.draft_steps} steps, "
        f"reward = global (which mode) + {cfg.local_weight:g} x local (where inside the mode)")
    add_lora(backbone.network, "tuned", rank=cfg.lora_rank, target_modules=TOY_LORA_TARGETS)
    trainer = RewardTrainer(
        backbone,
        DraftK(num_steps=cfg.sample_steps, k=cfg.draft_k, adapter="tuned", sampler=SAMPLER, scheduler=SIGMAS),
        reward,
        [""],
        settings=TrainerSettings(lr=cfg.draft_lr, batch_size=cfg.draft_batch, grad_clip=10.0, weight_decay=0.0,
                                 seed=cfg.seed),
    )
    history = trainer.train(cfg.draft_steps, progress=progress)
    n_avg = min(10, len(history))
    first = sum(h["reward"] for h in history[:n_avg]) / n_avg
    last = sum(h["reward"] for h in history[-n_avg:]) / n_avg
    log(f"      training reward: {first:.3f} (first {n_avg} steps) -> {last:.3f} (last {n_avg} steps)")
    t_draft = time.perf_counter() - t_start - t_base

    log(f"[3/4] sampling {cfg.n_samples} points per method ({cfg.sample_steps} {SAMPLER} steps, {SIGMAS} sigmas)")
    seeds = 10_000 * (cfg.seed + 1)

    def draw(spec: str, scale: float, seed: int) -> torch.Tensor:
        return sample_points(backbone, cfg, cfg.n_samples, schedule=spec, lora_scale=scale, seed=seed)

    # the spectral distance's reference: the base model's samples from other seeds (so the base row shows the
    # distance that sampling noise alone gives)
    reference = toy_features(draw("base", 1.0, seeds + 5_000_000))
    results, points = [], {}
    for label, spec, scale in _methods(cfg):
        pts = draw(spec, scale, seeds)
        points[label] = pts
        results.append({"method": label, "schedule": spec, "lora_scale": scale, **measure(pts, reward, reference)})
    front = pareto_front([(r["diversity"], r["reward"]) for r in results])
    for r, on in zip(results, front):
        r["pareto"] = on
    t_sample = time.perf_counter() - t_start - t_base - t_draft

    log("[4/4] writing the figures and the tables")
    seconds = time.perf_counter() - t_start
    timing = {"base_training_s": t_base, "draft_s": t_draft, "sampling_and_metrics_s": t_sample, "total_s": seconds}
    fig_path, pareto_path, table_path, json_path = (out / "tradeoff.png", out / "pareto.png", out / "results.md",
                                                    out / "results.json")
    save_figure(_scatter_figure(points, results, reward), fig_path)
    # no error bars: the spread of single samples' rewards (the *_std columns) would hide the differences of means
    plotted = [{k: v for k, v in r.items() if not k.endswith("_std")} for r in results]
    save_figure(pareto_figure(plotted, rewards=["reward", "reward_global", "reward_local"], diversity="diversity",
                              label="method", title="toy demo: mean reward vs diversity (cosine diversity of the "
                                                    "random-Fourier features)"), pareto_path)
    training = {"reward_first": first, "reward_last": last,
                "base_loss_last": sum(base_losses[-100:]) / min(100, len(base_losses))}
    write_text_atomic(table_path, _markdown(results, cfg, training, timing))
    write_text_atomic(json_path, json.dumps({"config": asdict(cfg), "training": training, "timing": timing,
                                             "results": results}, indent=2))
    log(_table(results))
    log(f"run time {seconds:.0f} s (base {t_base:.0f} s, DRaFT {t_draft:.0f} s, sampling + metrics {t_sample:.0f} s)")
    log(f"figures: {fig_path.resolve()}, {pareto_path.resolve()}")
    log(f"table:   {table_path.resolve()}")
    return {"results": results, "history": history, "training": training, "timing": timing,
            "figure": str(fig_path), "pareto": str(pareto_path), "table": str(table_path), "json": str(json_path)}


def _table(results: list[dict]) -> str:
    lines = [
        "| method | reward | global | local | modes | mode entropy | off-dist. | diversity | Vendi | spectral | "
        "spectral log10 | front |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['reward']:.3f} | {r['reward_global']:.3f} | {r['reward_local']:.3f} | "
            f"{r['modes_covered']} | {r['mode_entropy']:.3f} | {100 * r['off_distribution']:.1f}% | "
            f"{r['diversity']:.3f} | {r['vendi']:.2f} | {r['spectral_distance']:.4f} | "
            f"{r['spectral_distance_log10']:.2f} | {'yes' if r['pareto'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def _markdown(results: list[dict], cfg: DemoConfig, training: dict, timing: dict) -> str:
    head = [
        "# rdt demo: the reward-diversity trade-off on a 2-D toy",
        "",
        f"Base model: an MLP (hidden {cfg.base_hidden}) trained {cfg.base_steps} steps on 8 Gaussian modes on a circle "
        "(radius 4, std 0.25), target: the mixture's exact denoiser. Reward = global (which mode: "
        f"(1 + cos angle) / 2) + {cfg.local_weight:g} x local (a bump at a sweet spot one std outward from each mode "
        f"centre). DRaFT-{cfg.draft_k} LoRA (rank {cfg.lora_rank}), {cfg.draft_steps} steps, batch "
        f"{cfg.draft_batch}; training reward {training['reward_first']:.3f} -> {training['reward_last']:.3f}. "
        f"{cfg.n_samples} samples per method, {cfg.sample_steps} {SAMPLER} steps on {SIGMAS} sigmas, seed {cfg.seed}. "
        f"Run time {timing['total_s']:.0f} s.",
        "",
        "Columns: reward = global + local (means over the samples). Modes: modes holding >= 2% of the "
        "on-distribution samples (of 8). Mode entropy: 1 = all modes equally used, 0 = one mode. Off-dist.: "
        "farther than 3 std from every mode centre (1.1% for exact samples of the mixture). Diversity: 1 - mean "
        "pairwise cosine of random-Fourier features of the points (Gaussian kernel, bandwidth 0.5: it sees both the "
        "mode and the place inside it); Vendi: the Vendi score of the same features; spectral / spectral log10: "
        "the AIG paper's spectral distance of those features to 2000 base samples from other seeds (linear, and on "
        "log10 eigenvalues). Front: on the Pareto front of (diversity, reward).",
        "",
    ]
    return "\n".join(head) + "\n" + _table(results)


def _scatter_figure(points: dict[str, torch.Tensor], results: list[dict], reward: ToyReward):
    """One scatter per method, with the mode centres (x) and the local sweet spots (+)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(points)
    cols = 5
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    centers, spots = reward.mixture.centers, reward.sweet_spots
    lim = reward.mixture.radius * 1.5
    by_method = {r["method"]: r for r in results}
    for k, (label, pts) in enumerate(points.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        p = pts.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35)
        ax.scatter(centers[:, 0], centers[:, 1], marker="x", color="black", s=25, linewidths=1)
        ax.scatter(spots[:, 0], spots[:, 1], marker="+", color="#d1495b", s=40, linewidths=1)
        r = by_method[label]
        ax.set_title(f"{label}\nglobal {r['reward_global']:.2f}  local {r['reward_local']:.2f}\n"
                     f"entropy {r['mode_entropy']:.2f}  off {100 * r['off_distribution']:.0f}%", fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdt_lib.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DemoConfig.out, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--draft-k", type=int, default=DemoConfig.draft_k,
                        help="DRaFT-K: sampling steps with gradient, 1 .. 25 (25 = the whole chain; "
                             "default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, rough numbers (for smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = DemoConfig(out=args.out, seed=args.seed, draft_k=args.draft_k)
    if not 1 <= args.draft_k <= cfg.sample_steps:
        parser.error(f"--draft-k must be in 1 .. {cfg.sample_steps} (the sampling steps), got {args.draft_k}")
    # The toy network is tiny: one thread is faster than several fighting over a busy machine.
    torch.set_num_threads(1)
    if args.quick:
        cfg.base_steps, cfg.draft_steps, cfg.n_samples, cfg.draft_batch, cfg.sample_steps = 1500, 30, 400, 32, 12
        cfg.draft_k = min(cfg.draft_k, cfg.sample_steps)
    try:
        run_demo(cfg, progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
