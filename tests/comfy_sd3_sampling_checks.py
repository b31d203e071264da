"""The dual-model sampling nodes on an SD3 MODEL inside ComfyUI's own process (run with ComfyUI's Python by
``test_nodes_sampling_sd3.py``; prints one ``RESULT {json}`` line).

Usage: ``python comfy_sd3_sampling_checks.py WORK`` with ``COMFYUI_DIR`` set; ``WORK`` holds
``transformer.safetensors`` (a tiny SD3 transformer, diffusers layout) and ``loras/rdt_sd3.safetensors`` (rdt's SD3
LoRA file for it). Under ``torch.inference_mode()`` as ComfyUI's executor runs nodes:

- the base MODEL is ``comfy.sd.load_diffusion_model_state_dict`` of the transformer (ComfyUI converts the diffusers
  layout to its MMDiT, fusing q / k / v), the tuned MODEL is ``LoraLoaderModelOnly`` on it (offset patches on the
  fused weights);
- references are ComfyUI's KSampler (``nodes.common_ksampler``) on each MODEL and the KSamplerAdvanced chain;
- ours: ``RDTDualModelKSampler`` and ``RDTDualModelGuider`` + ``SamplerCustomAdvanced``, with the sigmas and tuned
  weights each evaluation used recorded from the guider's mixer, and the guider's plan (``rows``: one batched
  pass; ``weights``: the weight-function fallback, also forced once).

With ``flux_transformer.safetensors``, ``flux_config.json`` and ``loras/rdt_flux.safetensors`` in ``WORK`` a tiny
Flux MODEL gets the same comparisons at CFG 1 (result ``flux``).

Conditioning is made by hand in SD3's shapes: ``c_crossattn`` ``[1, T, context dim]`` (T differs between the
positive and the negative) and ``pooled_output``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from comfy_inprocess import setup_comfy  # noqa: E402

SEED = 77
STEPS = 4
CFG_BASE, CFG_TUNED = 3.0, 2.0
TOKENS = 8, 12  # positive, negative: lengths differ as SD3's T5 parts do; ComfyUI batches them repeated to 24


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def main() -> None:
    import torch

    work = Path(sys.argv[1])
    setup_comfy(os.environ["COMFYUI_DIR"], work)
    import comfy.model_sampling
    import comfy.sd
    import nodes
    from comfy_extras import nodes_custom_sampler as custom
    from safetensors.torch import load_file

    from comfy_rdt_nodes import comfy_guider, lora_patches
    from comfy_rdt_nodes.nodes_sampling import RDTDualModelGuider, RDTDualModelKSampler

    recorded: list = []  # (sigma, w) of each evaluation of the last dual run
    plans: list = []     # the guider's mode and evaluation counts of each run

    class RecordingGuider(comfy_guider.DualModelGuider):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weight = self.dual.weight
            recorded.clear()

            def record(sigma, sigmas=None):
                w = weight(sigma, sigmas)
                recorded.append((float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma), w))
                return w

            self.dual.weight = record
            plans.append((self.mode, self.dual.evaluations))

    comfy_guider.DualModelGuider = RecordingGuider  # _make_guider imports it from the module at each call

    out: dict = {}
    with torch.inference_mode():
        base = comfy.sd.load_diffusion_model_state_dict(load_file(str(work / "transformer.safetensors")),
                                                        model_options={"dtype": torch.float32})
        if base is None:
            raise RuntimeError("ComfyUI did not detect the tiny SD3 transformer")
        out["model_type"] = type(base.model).__name__
        ms = base.model.model_sampling
        out["model_sampling"] = [type(ms).__name__, float(getattr(ms, "shift", float("nan")))]
        out["latent_format"] = type(base.model.latent_format).__name__
        tuned = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "rdt_sd3.safetensors", 1.0)[0]
        extra = {k: v[len(base.patches.get(k, [])):] for k, v in tuned.patches.items()}
        out["lora_patches"] = sum(len(v) for v in extra.values())
        out["offset_patches"] = sum(1 for v in extra.values() for e in v if e[3] is not None)

        dm = base.model.diffusion_model
        context_dim = dm.context_embedder.in_features
        pooled_dim = dm.y_embedder.mlp[0].in_features
        g = torch.Generator().manual_seed(0)

        def cond(tokens):
            return [[torch.randn(1, tokens, context_dim, generator=g),
                     {"pooled_output": torch.randn(1, pooled_dim, generator=g)}]]

        positive, negative = cond(TOKENS[0]), cond(TOKENS[1])
        latent = {"samples": torch.zeros(1, 16, 16, 16)}  # EmptySD3LatentImage: 16 channels, 128 px

        def ksampler(model, cfg, steps=STEPS, sampler="euler", scheduler="simple"):
            return nodes.common_ksampler(model, SEED, steps, cfg, sampler, scheduler, positive, negative, latent)[0][
                "samples"]

        def dual(schedule, steps=STEPS, sampler="euler", scheduler="simple", cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED):
            res = RDTDualModelKSampler().sample(base, positive, negative, latent, SEED, steps, cfg_base, cfg_tuned,
                                                sampler, scheduler, 1.0, schedule=schedule, tuned_model=tuned)
            return res[0]["samples"]

        # ---- base / tuned schedules against KSampler on each MODEL
        for sampler in ("euler", "dpmpp_2m"):
            ref_b, ref_t = ksampler(base, CFG_BASE, sampler=sampler), ksampler(tuned, CFG_TUNED, sampler=sampler)
            out[f"{sampler}_ref_gap"] = _maxdiff(ref_b, ref_t)
            out[f"{sampler}_scale"] = float(ref_b.abs().max())
            out[f"{sampler}_base_vs_ksampler"] = _maxdiff(dual("base", sampler=sampler), ref_b)
            out[f"{sampler}_tuned_vs_ksampler"] = _maxdiff(dual("tuned", sampler=sampler), ref_t)
            out[f"{sampler}_tuned_mode"] = plans[-1][0]

        # ---- one Euler step: a constant weight w mixes the two one-step results
        w = 0.3
        one_b, one_t = ksampler(base, CFG_BASE, steps=1), ksampler(tuned, CFG_TUNED, steps=1)
        out["one_step_ref_gap"] = _maxdiff(one_b, one_t)
        mixed = dual(f"keyframes:0={w}", steps=1)
        out["one_step_mix_vs_hand"] = _maxdiff(mixed, (1 - w) * one_b + w * one_t)
        out["one_step_mix_vs_base"] = _maxdiff(mixed, one_b)
        out["one_step_mode"], out["one_step_evaluations"] = plans[-1][0], dict(plans[-1][1])

        # ---- the same through the "weights" fallback (what offset patches took before the rows plan read offsets,
        # and still take when they are not plain LoRAs on output rows): forced by hiding the offset LoRAs' terms
        plain_term = lora_patches.low_rank_term
        lora_patches.low_rank_term = lambda entry: None if entry[3] is not None else plain_term(entry)
        try:
            out["weights_one_step_mix_vs_hand"] = _maxdiff(dual(f"keyframes:0={w}", steps=1),
                                                           (1 - w) * one_b + w * one_t)
            out["weights_one_step_mode"] = plans[-1][0]
            out["weights_tuned_vs_ksampler"] = _maxdiff(dual("tuned"), ksampler(tuned, CFG_TUNED))
        finally:
            lora_patches.low_rank_term = plain_term

        # ---- switch:K against ComfyUI's KSamplerAdvanced chain (base for K steps, then the tuned MODEL)
        k = 2
        adv = nodes.KSamplerAdvanced()
        first = adv.sample(base, "enable", SEED, STEPS, CFG_BASE, "euler", "simple", positive, negative, latent,
                           0, k, "enable")[0]
        chain = adv.sample(tuned, "disable", SEED, STEPS, CFG_TUNED, "euler", "simple", positive, negative, first,
                           k, 10000, "disable")[0]["samples"]
        out["chain_vs_base"] = _maxdiff(chain, ksampler(base, CFG_BASE))
        out["switch_vs_chain"] = _maxdiff(dual(f"switch:{k}"), chain)
        out["switch_vs_late_switch"] = _maxdiff(dual(f"switch:{k}"), dual(f"switch:{k + 1}"))

        # ---- linear: the sigmas each evaluation saw and the weights they got
        dual("linear")
        out["linear_sigmas"] = [s for s, _ in recorded]
        out["linear_weights"] = [wt for _, wt in recorded]
        sig = comfy.samplers.KSampler(base, steps=STEPS, device="cpu", sampler="euler", scheduler="simple",
                                      denoise=1.0, model_options=base.model_options).sigmas
        out["ksampler_sigmas"] = [float(s) for s in sig]
        out["linear_mode"], out["linear_evaluations"] = plans[-1][0], dict(plans[-1][1])
        dual("linear", sampler="heun")  # two evaluations per step, the second at the next step's sigma
        out["heun_sigmas"] = [s for s, _ in recorded]
        out["heun_weights"] = [wt for _, wt in recorded]

        # ---- the guider with SamplerCustomAdvanced equals the KSampler node (power:2, dpmpp_2m)
        guider = RDTDualModelGuider().get_guider(base, positive, negative, CFG_BASE, CFG_TUNED, schedule="power:2",
                                                 tuned_model=tuned)[0]
        sigmas = _node_outputs(custom.BasicScheduler, base, "simple", STEPS, 1.0)[0]
        sampler_obj = _node_outputs(custom.KSamplerSelect, "dpmpp_2m")[0]
        noise = _node_outputs(custom.RandomNoise, SEED)[0]
        got = _node_outputs(custom.SamplerCustomAdvanced, noise, guider, sampler_obj, sigmas, latent)[0]["samples"]
        out["guider_vs_node"] = _maxdiff(got, dual("power:2", sampler="dpmpp_2m"))
        out["power_vs_base"] = _maxdiff(got, ksampler(base, CFG_BASE, sampler="dpmpp_2m"))
        if (work / "flux_transformer.safetensors").exists():
            out["flux"] = _flux_checks(work, plans)
    print("RESULT " + json.dumps(out), flush=True)


def _node_outputs(cls, *args) -> tuple:
    """The outputs of a core node called with positional inputs: a V3 node's ``execute(...).args`` (these
    custom-sampling nodes are V3 from ComfyUI 0.3.7x) or a classic node's ``FUNCTION`` method (0.3.64)."""
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(*args).args)
    return getattr(cls(), cls.FUNCTION)(*args)


def _load_tiny_flux(path: Path, num_heads: int, axes_dim: list[int]):
    """ComfyUI's Flux MODEL from a diffusers-layout transformer, loaded as ``load_diffusion_model_state_dict``
    does; its detection fixes Flux's 24 heads and rope axes (16, 56, 56), so the tiny model's are set in the
    detected config."""
    import torch

    import comfy.model_detection
    import comfy.model_patcher
    from safetensors.torch import load_file

    sd = comfy.model_detection.convert_diffusers_mmdit(load_file(str(path)), "")
    config = comfy.model_detection.model_config_from_unet(sd, "")
    # 0.3.64's detection also fixes Flux's width (3072) and text width (4096); 0.3.7x reads them from the weights
    config.unet_config.update(num_heads=num_heads, axes_dim=list(axes_dim), hidden_size=sd["img_in.weight"].shape[0],
                              context_in_dim=sd["txt_in.weight"].shape[1])
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _flux_checks(work: Path, plans: list) -> dict:
    """Flux (guidance-distilled, CFG 1: no negative pass) with rdt's Flux LoRA: the same comparisons, Euler."""
    import torch

    import nodes
    from comfy_rdt_nodes.nodes_sampling import RDTDualModelKSampler

    spec = json.loads((work / "flux_config.json").read_text())
    base = _load_tiny_flux(work / "flux_transformer.safetensors", spec["num_heads"], spec["axes_dim"])
    tuned = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "rdt_flux.safetensors", 1.0)[0]
    extra = {k: v[len(base.patches.get(k, [])):] for k, v in tuned.patches.items()}
    res = {"model_type": type(base.model).__name__, "lora_patches": sum(len(v) for v in extra.values()),
           "offset_patches": sum(1 for v in extra.values() for e in v if e[3] is not None),
           "lora_keys": sum(1 for _ in extra)}
    dm = base.model.diffusion_model
    g = torch.Generator().manual_seed(1)

    def cond(tokens):
        return [[torch.randn(1, tokens, dm.txt_in.in_features, generator=g),
                 {"pooled_output": torch.randn(1, dm.vector_in.in_layer.in_features, generator=g), "guidance": 3.5}]]

    positive, negative = cond(8), cond(8)
    latent = {"samples": torch.zeros(1, 16, 16, 16)}

    def ksampler(model, steps):
        return nodes.common_ksampler(model, SEED, steps, 1.0, "euler", "simple", positive, negative, latent)[0][
            "samples"]

    def dual(schedule, steps):
        return RDTDualModelKSampler().sample(base, positive, negative, latent, SEED, steps, 1.0, 1.0, "euler",
                                             "simple", 1.0, schedule=schedule, tuned_model=tuned)[0]["samples"]

    ref_b, ref_t = ksampler(base, STEPS), ksampler(tuned, STEPS)
    res["ref_gap"] = _maxdiff(ref_b, ref_t)
    res["base_vs_ksampler"] = _maxdiff(dual("base", STEPS), ref_b)
    res["tuned_vs_ksampler"] = _maxdiff(dual("tuned", STEPS), ref_t)
    w = 0.3
    one_b, one_t = ksampler(base, 1), ksampler(tuned, 1)
    res["one_step_ref_gap"] = _maxdiff(one_b, one_t)
    mixed = dual(f"keyframes:0={w}", 1)
    res["one_step_mix_vs_hand"] = _maxdiff(mixed, (1 - w) * one_b + w * one_t)
    res["one_step_mix_vs_base"] = _maxdiff(mixed, one_b)
    res["one_step_mode"], res["one_step_evaluations"] = plans[-1][0], dict(plans[-1][1])
    return res


if __name__ == "__main__":
    main()
