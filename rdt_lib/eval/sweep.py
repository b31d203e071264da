"""The evaluation sweep: sample every (schedule, prompt, seed) image once, score them, write the results.

:func:`run_sweep` checks everything it can before sampling (config, prompts, models, LoRA fit, rewards, embedder),
then samples what the image cache (:mod:`.cache`) does not hold yet, in fixed batches of ``run.batch_size``
images of one schedule. Under ``accelerate launch`` the batches are dealt out to the processes in turn (batch
``b`` to process ``b mod P``); every image's noise comes from its own seed and a batch is the same whatever the
number of processes, so the images, and the metrics the main process computes from the cached PNGs after all
processes finished, equal a one-process run's.

Per schedule (one row): mean and standard deviation (over images) of each reward; diversity (1 - mean pairwise
cosine of DINO CLS embeddings within each prompt's images, mean over prompts); Vendi score (per prompt, mean over
prompts); spectral distance of the schedule's embeddings to the base schedule's, linear and log10.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError, one_line
from ..evaluation.diversity import grouped_diversity, spectral_distance, vendi_score
from ..sampling import sample
from .cache import ImageCache
from .config import EvalConfig
from .models import SweepModels, SweepSchedule, load_models, parse_sweep_schedule
from .prompts import load_prompts

__all__ = ["SweepResult", "run_sweep", "resolve_device", "resolve_dtype", "METRIC_COLUMNS"]

METRIC_COLUMNS = ("diversity", "vendi", "spectral_distance", "spectral_distance_log10")


@dataclass
class SweepResult:
    """What a sweep produced: one row per schedule (``name``, ``<reward>``, ``<reward>_std``, metrics, ``images``),
    the reward labels, the output paths (main process only), images sampled by this process and timings (s)."""

    rows: list[dict[str, Any]]
    rewards: list[str]
    outputs: dict[str, Path] = field(default_factory=dict)
    sampled: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class _LocalState:
    num_processes, process_index, is_main_process = 1, 0, True
    device = None

    def wait_for_everyone(self) -> None:
        pass


def _process_state():
    """accelerate's ``PartialState`` when launched with several processes, else a one-process stand-in."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available())
    return _LocalState()


def _agree(state: Any, failure: BaseException | None) -> None:
    """Raise ``failure``; with several processes, every process first learns whether any failed (so none waits
    for a process that stopped), and the others raise an :class:`InputError` quoting it."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object([one_line(failure) if failure is not None else ""])
        others = [m for m in messages if m]
        if failure is None and others:
            raise InputError(f"another process stopped before sampling: {others[0]}")
    if failure is not None:
        raise failure


def resolve_device(name: str, state: Any = None) -> torch.device:
    if name == "auto":
        if state is not None and getattr(state, "device", None) is not None:
            return torch.device(state.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _group_settings(config: EvalConfig, models: SweepModels, schedule: SweepSchedule, dtype: torch.dtype,
                    device: torch.device) -> dict[str, Any]:
    """Everything that changes a schedule's pixels (the cache group)."""
    s = config.sampling
    base_cfg = models.base.default_cfg if config.model.cfg_scale is None else config.model.cfg_scale
    settings: dict[str, Any] = {
        "base": models.base_id, "schedule": schedule.canonical, "sampler": s.sampler, "scheduler": s.scheduler,
        "steps": s.steps, "eta": s.eta, "resolution": s.resolution, "negative_prompt": s.negative_prompt,
        "cfg_base": base_cfg, "dtype": str(dtype), "device": device.type,
    }
    if schedule.uses_tuned:
        tuned_cfg = config.tuned.cfg_scale if config.tuned.cfg_scale is not None else base_cfg
        settings.update(tuned=models.tuned_id, cfg_tuned=tuned_cfg, lora_scale=schedule.lora_scale)
    return settings


def _reward_labels(config: EvalConfig) -> list[str]:
    names = [r.name.strip().lower() for r in config.rewards]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def run_sweep(config: EvalConfig, *, log: Callable[[str], None] | None = None,
              sampler: Callable[..., Any] | None = None) -> SweepResult:
    """Run the sweep of ``config`` (validated, e.g. by :func:`rdt_lib.eval.config.load_config`).

    ``sampler`` replaces :func:`rdt_lib.sampling.sample` (tests count or interrupt the calls through it).
    Raises :class:`~rdt_lib.errors.UserError` subclasses for bad inputs, before any image is sampled.
    """
    state = _process_state()
    main = state.is_main_process
    say = log or (lambda msg: print(msg, flush=True) if main else None)
    draw = sampler or sample
    t_start = time.perf_counter()

    # ---- everything that can be wrong, before any sampling (every process learns whether one failed)
    failure: BaseException | None = None
    try:
        p = config.prompts
        prompts = load_prompts(p.source, column=p.column, split=p.split, limit=p.limit, inline=p.text)
        seeds = list(p.seeds) or list(range(p.images_per_prompt))
        schedules = [parse_sweep_schedule(name) for name in config.schedules.names]
        device = resolve_device(config.run.device, state)
        dtype = resolve_dtype(config.run.dtype, device)
        need_tuned = any(s.uses_tuned for s in schedules)
        models = load_models(config, device=device, dtype=dtype, need_tuned=need_tuned)
        labels = _reward_labels(config)
        rewards, embedder = ([], None)
        if main:
            rewards, embedder = _load_scorers(config, device)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes heard of it
        failure = exc
    _agree(state, failure)
    t_loaded = time.perf_counter()

    run_dir = Path(config.run.output_dir).expanduser()
    cache = ImageCache(run_dir / "cache")
    groups = [_group_settings(config, models, s, dtype, device) for s in schedules]
    items = [(prompt, seed) for prompt in prompts for seed in seeds]
    bs = config.run.batch_size
    batches = [(k, items[i:i + bs]) for k in range(len(schedules)) for i in range(0, len(items), bs)]
    mine = batches[state.process_index::state.num_processes]
    todo = [(k, batch) for k, batch in mine if not all(cache.has(groups[k], pr, sd) for pr, sd in batch)]
    total = sum(len(b) for _, b in mine)
    done_before = total - sum(len(b) for _, b in todo)
    say(f"sweep: {len(schedules)} schedule(s) x {len(prompts)} prompt(s) x {len(seeds)} seed(s) = "
        f"{len(schedules) * len(items)} images; {len(batches)} batch(es) over {state.num_processes} process(es); "
        f"{done_before} of this process's {total} cached")

    # ---- sampling (only what is not cached)
    sampled = 0
    bar = None
    if config.run.progress_bar and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done_before, desc="sweep", unit="img", dynamic_ncols=True)
    res = config.sampling.resolution or None
    try:
        for k, batch in todo:
            schedule = schedules[k]
            base, tuned = models.branches(schedule, config)
            out = draw(base, [pr for pr, _ in batch], tuned=tuned, schedule=schedule.mix,
                       sampler=config.sampling.sampler, scheduler=config.sampling.scheduler,
                       num_steps=config.sampling.steps, seeds=[sd for _, sd in batch], height=res, width=res,
                       eta=config.sampling.eta, negative_prompt=config.sampling.negative_prompt)
            for (pr, sd), image in zip(batch, out.images):
                if not cache.has(groups[k], pr, sd):
                    cache.put(groups[k], pr, sd, image)
                    sampled += 1
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix_str(schedule.name)
    finally:
        if bar is not None:
            bar.close()
    t_sampled = time.perf_counter()
    state.wait_for_everyone()
    if not main:
        return SweepResult([], labels, sampled=sampled)

    # ---- metrics on the main process, from the cached PNGs (the same whatever sampled them)
    timings = {"loading": t_loaded - t_start, "sampling": t_sampled - t_loaded, "scoring": 0.0, "embedding": 0.0}
    groups_of = [i for i, _ in enumerate(prompts) for _ in seeds]
    rows: list[dict[str, Any]] = []
    base_emb = None
    embeddings: list[torch.Tensor | None] = []
    images_of: list[torch.Tensor] = []
    mb = config.metrics.batch_size
    for k, schedule in enumerate(schedules):
        images = torch.stack([cache.get(groups[k], pr, sd) for pr, sd in items])
        images_of.append(images)
        row: dict[str, Any] = {"name": schedule.name}
        t0 = time.perf_counter()
        for label, reward in zip(labels, rewards):
            with torch.no_grad():
                scores = torch.cat([reward(images[i:i + mb].to(reward.device), [pr for pr, _ in items[i:i + mb]])
                                    .float().cpu() for i in range(0, len(items), mb)])
            row[label] = float(scores.mean())
            row[f"{label}_std"] = float(scores.std(unbiased=False))
        t1 = time.perf_counter()
        emb = embedder.embed(images, batch_size=mb) if embedder is not None else None
        timings["scoring"] += t1 - t0
        timings["embedding"] += time.perf_counter() - t1
        embeddings.append(emb)
        if emb is not None:
            if config.metrics.diversity:
                row["diversity"] = grouped_diversity(emb, groups_of)
            if config.metrics.vendi:
                row["vendi"] = sum(vendi_score(emb[i * len(seeds):(i + 1) * len(seeds)])
                                   for i in range(len(prompts))) / len(prompts)
        if schedule.name.strip().lower() == "base":
            base_emb = emb
        row["images"] = len(items)
        rows.append(row)
    if config.metrics.spectral and base_emb is not None:
        for row, emb in zip(rows, embeddings):
            row["spectral_distance"] = spectral_distance(base_emb, emb)
            row["spectral_distance_log10"] = spectral_distance(base_emb, emb, log10=True)
    for row in rows:  # a fixed column order
        ordered = {"name": row["name"]}
        for label in labels:
            ordered[label], ordered[f"{label}_std"] = row[label], row[f"{label}_std"]
        ordered.update({c: row[c] for c in METRIC_COLUMNS if c in row})
        ordered["images"] = row["images"]
        row.clear()
        row.update(ordered)

    from .report import write_outputs

    t0 = time.perf_counter()
    outputs = write_outputs(run_dir, config, rows, labels, prompts, seeds, images_of, timings)
    timings["outputs"] = time.perf_counter() - t0
    bad = [r["name"] for r in rows if any(isinstance(v, float) and not math.isfinite(v) for v in r.values())]
    if bad:
        say(f"warning: non-finite metrics for {', '.join(bad)}")
    say(f"sampled {sampled} new image(s); sampling {timings['sampling']:.1f} s, scoring {timings['scoring']:.1f} s, "
        f"embedding {timings['embedding']:.1f} s; report: {outputs['report']}")
    return SweepResult(rows, labels, outputs, sampled, timings)


def _load_scorers(config: EvalConfig, device: torch.device):
    """The reward models and the DINO embedder (None when no embedding metric is on)."""
    from ..rewards import load_reward
    from .embedding import DinoEmbedder

    rewards = [load_reward(r.name, path=r.path or None, device=device) for r in config.rewards]
    m = config.metrics
    embedder = (DinoEmbedder.from_pretrained(m.embedder, device=device)
                if (m.diversity or m.vendi or m.spectral) else None)
    return rewards, embedder
