"""``python -m rdt_lib.eval``: a full sweep on the tiny SD pipeline writes every output, reruns sample only what is
new, an interrupted sweep resumes to the same results, LoRA files of other tools load and sample, two processes
give the same CSV as one, the report page shows its images in Chromium.

References: the metrics are recomputed here with numpy from the cached images' embeddings; LoRA'd images are
compared with the same sampling on a UNet whose weights carry the LoRA's known delta (kohya's formula by hand) or
on the PEFT model that wrote the adapter.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_fixtures import SCHEDULES, eval_config, eval_overrides, tiny_vit_dir
from rdt_lib.eval import run_sweep
from rdt_lib.eval.cli import main
from rdt_lib.sampling import sample
from train_fixtures import tiny_sd_dir

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("results.csv", "results.json", "pareto.png", "report.html", "sweep.toml")


class Recorder:
    """Stands in for ``rdt_lib.sampling.sample``: records each call's schedule and images; raises after
    ``fail_after`` calls (an interrupted sweep)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, list[str], list[int], torch.Tensor]] = []
        self.fail_after = fail_after

    def __call__(self, base, prompts, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("injected interruption")
        out = sample(base, prompts, **kwargs)
        self.calls.append((str(kwargs["schedule"]) + (f"@{kwargs['tuned'].lora_scale:g}" if kwargs.get("tuned")
                                                      and kwargs["tuned"].lora_scale != 1 else ""),
                           list(prompts), list(kwargs["seeds"]), out.images.clone()))
        return out


def _run_cli(monkeypatch, out_dir: Path, recorder: Recorder, **extra) -> int:
    monkeypatch.setattr("rdt_lib.eval.sweep.sample", recorder)
    argv = ["--config", "tiny_cpu"]
    for item in eval_overrides(out_dir, **extra):
        argv += ["--set", item]
    return main(argv)


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One full sweep (4 schedules x 2 prompts x 2 seeds, batches of 2) through the command line."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    recorder = Recorder()
    mp = pytest.MonkeyPatch()
    try:
        assert _run_cli(mp, out, recorder) == 0
    finally:
        mp.undo()
    return out, recorder


def test_full_sweep_writes_every_output_with_one_finite_row_per_schedule(first_run):
    out, recorder = first_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = _rows(out / "results.csv")
    assert [r["name"] for r in rows] == SCHEDULES
    for r in rows:
        values = {k: float(v) for k, v in r.items() if k != "name"}
        assert all(math.isfinite(v) for v in values.values()), r
        assert values["images"] == 4 and 0 <= values["diversity"] <= 2 and 1 <= values["vendi"] <= 2
    assert {r["name"]: (out / "grids" / f"{r['name'].replace(':', '_')}.png").is_file() for r in rows} == \
        dict.fromkeys(SCHEDULES, True)
    # 4 schedules x 2 batches of 2 images; the same prompts and seeds for every schedule
    assert len(recorder.calls) == 8
    assert sorted({(tuple(p), tuple(s)) for _, p, s, _ in recorder.calls}) == [(("a cat", "a cat"), (0, 1)),
                                                                               (("a dog", "a dog"), (0, 1))]
    # the LoRA changes the images, so the rows compare different things
    by = {c[0]: c[3] for c in recorder.calls}
    assert (by["base"] - by["tuned"]).abs().max() > 0.05
    assert rows[0]["aesthetic"] != rows[1]["aesthetic"]
    assert float(rows[0]["spectral_distance"]) == 0.0 and float(rows[1]["spectral_distance"]) > 0
    page = (out / "report.html").read_text()
    assert 'src="pareto.png"' in page and 'src="grids/lora_0.5.png"' in page


def test_metrics_equal_a_numpy_recomputation_from_the_cached_images(first_run):
    from rdt_lib.eval.cache import ImageCache
    from rdt_lib.eval.embedding import DinoEmbedder

    out, _ = first_run
    rows = {r["name"]: r for r in _rows(out / "results.csv")}
    embedder = DinoEmbedder.from_pretrained(str(tiny_vit_dir()))
    cache = ImageCache(out / "cache")
    feats = {}
    import json

    for group in sorted((out / "cache").iterdir()):
        settings = json.loads((group / "settings.json").read_text())
        name = {"base": "base", "tuned": "tuned", "linear": "linear"}.get(settings["schedule"], None)
        if settings.get("lora_scale") == 0.5:
            name = "lora:0.5"
        images = torch.stack([cache.get(settings, p, s) for p in ("a cat", "a dog") for s in (0, 1)])
        feats[name] = embedder(images).double().numpy()
    assert sorted(feats) == sorted(SCHEDULES)

    def diversity(e):
        out_ = []
        for g in (e[:2], e[2:]):
            u = g / np.linalg.norm(g, axis=1, keepdims=True)
            out_.append(1 - float(u[0] @ u[1]))
        return sum(out_) / 2

    def vendi(e):
        vals = []
        for g in (e[:2], e[2:]):
            u = g / np.linalg.norm(g, axis=1, keepdims=True)
            lam = np.clip(np.linalg.eigvalsh(u @ u.T / 2), 0, None)
            lam = lam[lam > 1e-15] / lam.sum()
            vals.append(math.exp(-float((lam * np.log(lam)).sum())))
        return sum(vals) / 2

    def spectrum(e):
        return np.sort(np.linalg.eigvalsh(np.cov(e, rowvar=False)))

    values = [diversity(e) for e in feats.values()]
    assert max(values) - min(values) > 1e-3  # the schedules differ by far more than the tolerances below
    for name, e in feats.items():
        row = rows[name]
        assert float(row["diversity"]) == pytest.approx(diversity(e), rel=1e-4, abs=1e-7)
        assert float(row["vendi"]) == pytest.approx(vendi(e), rel=1e-4)
        dist = float(np.linalg.norm(spectrum(feats["base"]) - spectrum(e)))
        assert float(row["spectral_distance"]) == pytest.approx(dist, rel=1e-3, abs=1e-7)


def test_rerun_with_one_more_schedule_samples_only_that_schedule(first_run, tmp_path, monkeypatch, capsys):
    out, _ = first_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = _rows(copy / "results.csv")
    recorder = Recorder()
    assert _run_cli(monkeypatch, copy, recorder, **{"schedules.names": SCHEDULES + ["power:2"],
                                                    "run.progress_bar": True}) == 0
    assert [c[0] for c in recorder.calls] == ["power:2", "power:2"]
    captured = capsys.readouterr()
    assert "16 of this process's 20 cached" in captured.out
    assert "sweep: 100%" in captured.err and "20/20" in captured.err  # one bar over the whole sweep
    after = _rows(copy / "results.csv")
    assert after[:4] == before and after[4]["name"] == "power:2"


def test_interrupted_sweep_resumes_and_ends_with_the_same_csv(first_run, tmp_path, monkeypatch):
    out, _ = first_run
    interrupted = Recorder(fail_after=3)
    assert _run_cli(monkeypatch, tmp_path / "run", interrupted) == 130
    assert not (tmp_path / "run" / "results.csv").exists()
    resumed = Recorder()
    assert _run_cli(monkeypatch, tmp_path / "run", resumed) == 0
    assert len(resumed.calls) == 8 - 3
    assert (tmp_path / "run" / "results.csv").read_text() == (out / "results.csv").read_text()


def test_other_settings_in_the_same_run_directory_keep_their_images_apart(first_run, tmp_path, monkeypatch):
    out, _ = first_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    groups = {p.name for p in (copy / "cache").iterdir()}
    recorder = Recorder()
    assert _run_cli(monkeypatch, copy, recorder, **{"sampling.steps": 3, "schedules.names": ["base", "tuned"]}) == 0
    assert [c[0] for c in recorder.calls] == ["base", "base", "tuned", "tuned"]  # nothing reused
    assert groups < {p.name for p in (copy / "cache").iterdir()}  # the first sweep's images are still there
    assert [r["name"] for r in _rows(copy / "results.csv")] == ["base", "tuned"]


# --------------------------------------------------------------------------------------------------------------
# LoRA files of other tools


def _sweep_images(tmp_path, monkeypatch, sdxl: bool, lora: Path) -> dict[str, torch.Tensor]:
    recorder = Recorder()
    monkeypatch.setattr("rdt_lib.eval.sweep.sample", recorder)
    config = eval_config(tmp_path / "run", sdxl=sdxl, **{"tuned.path": str(lora), "schedules.names": ["base", "tuned"],
                                                        "prompts.text": ["a cat"], "metrics.spectral": False})
    run_sweep(config, log=lambda msg: None)
    return {c[0]: c[3] for c in recorder.calls}


def _reference(backbone, adapter=None, decode: bool = True) -> torch.Tensor:
    from rdt_lib.denoisers import ModelBranch

    out = sample(ModelBranch(backbone, adapter, cfg_scale=2.0), ["a cat", "a cat"], seeds=[0, 1], sampler="ddim",
                 scheduler="normal", num_steps=2, height=16, width=16, decode=decode)
    return out.images if decode else out.latents


def test_kohya_ldm_style_sdxl_lora_loads_and_samples(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from ldm_checkpoint import unet_prefix_map
    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from test_lora_io import _apply_delta, _known_kohya_delta, _kohya_file

    reference = StableDiffusionBackbone.from_pretrained(tiny_sd_dir(True))
    delta = _known_kohya_delta(reference.network)
    ldm_of = {d: l for d, l, _ in unet_prefix_map(reference.network.config)}
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}

    def rename(path):
        prefix = max((d for d in ldm_of if path.startswith(d + ".")), key=len)
        rest = path[len(prefix) + 1:]
        return f"{ldm_of[prefix]}.{resnet.get(rest, rest)}"

    tensors = _kohya_file(delta, rename)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    save_file(tensors, str(tmp_path / "ldm_sdxl.safetensors"))
    images = _sweep_images(tmp_path, monkeypatch, True, tmp_path / "ldm_sdxl.safetensors")
    base_ref = _reference(reference)
    _apply_delta(reference.network, delta)
    tuned_ref = _reference(reference)
    assert (tuned_ref - base_ref).abs().max() > 0.05
    torch.testing.assert_close(images["base"], base_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(images["tuned"], tuned_ref, atol=1e-4, rtol=0)


def test_peft_lora_folder_loads_and_samples(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone

    reference = StableDiffusionBackbone.from_pretrained(tiny_sd_dir(False))
    base_ref = _reference(reference)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights="gaussian")
    peft_model = get_peft_model(reference.network, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    tuned_ref = _reference(reference, "default")  # the PEFT model's own adapter
    images = _sweep_images(tmp_path, monkeypatch, False, tmp_path / "adapter")
    assert (tuned_ref - base_ref).abs().max() > 0.05
    torch.testing.assert_close(images["base"], base_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(images["tuned"], tuned_ref, atol=1e-4, rtol=0)


def test_full_tuned_model_is_a_second_backbone(tmp_path, monkeypatch):
    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone
    from sd_fixtures import save_tiny_sd_pipeline

    other = save_tiny_sd_pipeline(tmp_path / "other_sd", seed=1)
    images = _sweep_images(tmp_path, monkeypatch, False, other)
    base = StableDiffusionBackbone.from_pretrained(tiny_sd_dir(False))
    base_ref = _reference(base)
    # the tuned network (and its text encoder) denoise; the base model's VAE decodes, as for every schedule
    tuned_ref = base.decode(_reference(StableDiffusionBackbone.from_pretrained(other), decode=False))
    assert (tuned_ref - base_ref).abs().max() > 0.05
    torch.testing.assert_close(images["base"], base_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(images["tuned"], tuned_ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# accelerate


def test_two_processes_give_the_same_csv_as_one(first_run, tmp_path):
    from test_train_accelerate import _launcher

    launcher = _launcher()
    if launcher is None:
        pytest.skip("neither accelerate nor torch.distributed.run is available")
    out, _ = first_run
    cmd = launcher + ["-m", "rdt_lib.eval", "--config", "tiny_cpu"]
    for item in eval_overrides(tmp_path / "two"):
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "8 batch(es) over 2 process(es)" in proc.stdout + proc.stderr
    assert (tmp_path / "two" / "results.csv").read_text() == (out / "results.csv").read_text()


# --------------------------------------------------------------------------------------------------------------
# the report page in a browser


def test_report_page_shows_the_plot_and_the_grids_in_chromium(first_run):
    from comfyui_browser import browser_missing, start_chromium

    missing = browser_missing()
    if missing:
        if os.environ.get("RDT_REQUIRE_BROWSER"):
            pytest.fail(f"RDT_REQUIRE_BROWSER is set but {missing}")
        pytest.skip(missing)
    out, _ = first_run
    driver = start_chromium()
    try:
        driver.get((out / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        rows = driver.execute_script("return document.querySelectorAll('tbody tr').length;")
    finally:
        driver.quit()
    srcs = {src: (complete, width) for src, complete, width in images}
    assert "pareto.png" in srcs and sum(s.startswith("grids/") for s in srcs) == len(SCHEDULES)
    assert all(complete and width > 0 for complete, width in srcs.values()), srcs
    assert rows == len(SCHEDULES)


def test_sd3_sweep_reads_a_flow_lora_and_samples_every_schedule(tmp_path, monkeypatch):
    """The sweep on a flow model (issue 15): a tiny SD3 base and the SD3 LoRA file rdt writes; every schedule's
    images equal ``sample()`` on the in-memory adapter that wrote the file (base, tuned, AIG linear)."""
    from flow_fixtures import make_tiny_sd3_pipeline, save_pipeline
    from rdt_lib.backbones.flow import FLOW_LORA_TARGETS
    from rdt_lib.backbones.loading import load_backbone
    from rdt_lib.denoisers import ModelBranch
    from rdt_lib.lora import add_lora
    from rdt_lib.lora_io import save_lora

    model = save_pipeline(make_tiny_sd3_pipeline(tmp_path / "tok"), tmp_path / "sd3")
    writer = load_backbone(model, kind="sd3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        add_lora(writer.network, "tuned", rank=2, alpha=2, init_lora_weights="gaussian",
                 target_modules=FLOW_LORA_TARGETS)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in writer.network.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora = save_lora(writer.network, tmp_path / "sd3_lora.safetensors", "tuned")

    recorder = Recorder()
    monkeypatch.setattr("rdt_lib.eval.sweep.sample", recorder)
    config = eval_config(tmp_path / "run", **{"model.path": str(model), "model.kind": "sd3", "tuned.path": str(lora),
                                              "schedules.names": ["base", "tuned", "linear"], "prompts.text": ["a cat"],
                                              "sampling.sampler": "euler", "sampling.resolution": 32})
    run_sweep(config, log=lambda msg: None)
    images = {c[0]: c[3] for c in recorder.calls}
    rows = _rows(tmp_path / "run" / "results.csv")
    assert [r["name"] for r in rows] == ["base", "tuned", "linear"]
    assert all(math.isfinite(float(r["aesthetic"])) for r in rows)

    def reference(schedule: str) -> torch.Tensor:
        return sample(ModelBranch(writer, cfg_scale=2.0), ["a cat", "a cat"], seeds=[0, 1],
                      tuned=ModelBranch(writer, "tuned", cfg_scale=2.0), schedule=schedule, sampler="euler",
                      scheduler="normal", num_steps=2, height=32, width=32).images

    refs = {s: reference(s) for s in ("base", "tuned", "linear")}
    assert (refs["tuned"] - refs["base"]).abs().max() > 0.02  # the LoRA changes the images far beyond the tolerance
    for schedule, ref in refs.items():
        torch.testing.assert_close(images[schedule], ref, atol=1e-4, rtol=0, msg=schedule)
