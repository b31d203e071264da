"""The trainer on an SDXL-architecture model and with bf16 mixed precision (CPU autocast), through the CLI.

Checks against independent computations: the saved kohya LoRA, loaded with diffusers' ``load_lora_weights``
into a fresh SDXL pipeline, reproduces the UNet output of the trained peft model; bf16 training changes
the LoRA and keeps the saved weights finite.
"""

from __future__ import annotations

import warnings

import torch

from sd_fixtures import unet_inputs
from train_fixtures import run_train_cli, tiny_sd_dir


def _train(tmp_path, capsys, *extra) -> None:
    run_train_cli(tmp_path / "out", capsys, *extra)


def test_sdxl_training_saves_a_lora_diffusers_loads(tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from rdt_lib.lora_io import load_lora_safetensors

    sdxl_dir = tiny_sd_dir(sdxl=True)
    _train(tmp_path, capsys, "run.max_steps=2", f'model.path="{sdxl_dir}"', "model.kind=\"sdxl\"")
    path = tmp_path / "out" / "lora.safetensors"
    tensors, meta = load_lora_safetensors(path)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert any(float(u.abs().max()) > 0 for u in ups)  # lora_B (= up) starts at zero: training moved it

    # fresh pipeline + the saved file vs the same pipeline without it: the LoRA changes the UNet output,
    # and diffusers applies exactly what we saved (W + alpha/rank * up @ down on every targeted layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
        lora = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
        lora.load_lora_weights(str(path))
    inputs = unet_inputs(sdxl=True)
    with torch.no_grad():
        out_plain = plain.unet(**inputs).sample
        out_lora = lora.unet(**inputs).sample
    assert not torch.allclose(out_plain, out_lora, atol=1e-6)

    # independent reference: merge the saved kohya weights into a copy of the plain UNet by hand
    merged = plain.unet
    modules = dict(merged.named_modules())
    alphas = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            up = tensors[stem + ".lora_up.weight"]
            name = next(n for n in modules if "lora_unet_" + n.replace(".", "_") == stem)
            scale = alphas.get(stem, down.shape[0]) / down.shape[0]
            modules[name].weight += scale * (up.float() @ down.float())
        out_ref = merged(**inputs).sample
    torch.testing.assert_close(out_lora, out_ref, rtol=0, atol=1e-4)


def test_bf16_mixed_precision_trains(tmp_path, capsys):
    from rdt_lib.lora_io import load_lora_safetensors

    _train(tmp_path, capsys, "run.max_steps=2", 'optim.mixed_precision="bf16"', "optim.lr=1e-2")
    tensors, meta = load_lora_safetensors(tmp_path / "out" / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # the same run in fp32 gives a LoRA close to, but not bit-equal with, the bf16 one
    _train(tmp_path / "fp32", capsys, "run.max_steps=2", "optim.lr=1e-2")
    ref, _ = load_lora_safetensors(tmp_path / "fp32" / "out" / "lora.safetensors")
    diffs = [float((tensors[k].float() - ref[k].float()).abs().max()) for k in ref if k.endswith("weight")]
    scale = max(float(ref[k].abs().max()) for k in ref if k.endswith("weight"))
    assert max(diffs) > 0, "bf16 autocast had no effect"
    assert max(diffs) < 0.2 * scale, (max(diffs), scale)
