"""In-process checks of the training backbone inside ComfyUI (run with ComfyUI's Python by
``test_nodes_training_inprocess.py``; prints one ``RESULT {json}`` line).

Under ``torch.inference_mode()`` as ComfyUI's executor runs nodes, on the tiny SD1.5 checkpoint loaded by
``comfy.sd.load_checkpoint_guess_config``:

- ``denoise``: ComfyBackbone's sigma-space denoiser against ``BaseModel.apply_model`` (ComfyUI's own), and
  ``forward_network`` (timestep units) against the same call's epsilon;
- training that fails in its second reward evaluation: every UNet / VAE module, parameter object,
  ``requires_grad`` and train flag is what it was before, no LoRA layer is left, the global RNG state is untouched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from comfy_inprocess import setup_comfy  # noqa: E402


class FailingReward(__import__("torch").nn.Module):
    """A differentiable reward (mean brightness) that raises on its ``fail_at``-th call."""

    needs_prompts = False
    name = "aesthetic"

    def __init__(self, fail_at: int) -> None:
        import torch

        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls, self.fail_at = 0, fail_at

    def score(self, images, prompts=None):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("reward failed on purpose")
        return images.float().mean(dim=(1, 2, 3)) * self.w


def _snapshot(modules):
    state = {}
    for root_name, root in modules.items():
        for name, m in root.named_modules():
            state[f"{root_name}:{name}"] = (id(m), m.training)
        for name, p in root.named_parameters():
            state[f"{root_name}:{name}.p"] = (id(p), p.requires_grad, p.is_inference())
    return state


def main() -> None:
    import torch

    comfy_dir = os.environ["COMFYUI_DIR"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup_comfy(comfy_dir, work)
        import comfy.sd
        import comfy_checkpoint
        from peft.tuners.lora import LoraLayer

        from comfy_rdt_nodes.comfy_backbone import ComfyBackbone
        from comfy_rdt_nodes.nodes_training import RewardInput, node_config, train_lora_in_comfy

        ckpt = comfy_checkpoint.write_tiny_sd15_checkpoint(work / "tiny.safetensors")
        out: dict = {}
        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True,
                                                                     output_clip=True)[:3]
            out["weights_are_inference"] = bool(next(model.model.diffusion_model.parameters()).is_inference())

            # ---- the denoiser against ComfyUI's apply_model
            bb = ComfyBackbone(model.clone(), clip, vae, resolution=32)
            cond = bb.encode_prompts(["a photo of a cat", "a red house"])
            g = torch.Generator().manual_seed(0)
            sigma = torch.tensor([2.5, 0.7])
            x = torch.randn(2, 4, 4, 4, generator=g) * sigma.view(-1, 1, 1, 1)
            ref = model.model.apply_model(x, sigma, c_crossattn=cond.tensors["encoder_hidden_states"])
            ours = bb.denoise(x, sigma, cond)
            out["denoise_vs_apply_model"] = float((ours - ref).abs().max())
            out["denoise_scale"] = float((ref - x).abs().max())
            ms = model.model.model_sampling
            t = ms.timestep(sigma)
            eps = bb.forward_network(ms.calculate_input(sigma, x), t, cond)
            out["forward_network_vs_apply_model"] = float(((x - sigma.view(-1, 1, 1, 1) * eps) - ref).abs().max())

            # ---- an error in the middle of training restores everything
            watched = {"unet": model.model.diffusion_model, "vae": vae.first_stage_model}
            before = _snapshot(watched)
            rng_before = torch.random.get_rng_state()
            handle = type("Handle", (), {"name": "aesthetic", "reward": FailingReward(fail_at=2), "patcher": None})()
            rewards = [RewardInput(handle, 1.0, "aesthetic")]
            config = node_config(objective="draft", prompts=["a cat"], steps=3, learning_rate=1e-3, lora_rank=2,
                                 lora_alpha=2.0, k=1, sampling_steps=2, batch_size=1, grad_accumulation=1,
                                 kl_coeff=0.0, l2_init_coeff=0.0, random_eta=False, seed=0, resolution=32, cfg=7.5,
                                 checkpoint_every=0, gradient_checkpointing=False, rewards=rewards, name="err",
                                 output_dir=str(work / "output" / "err"), base_name="tiny", resume=False)
            try:
                train_lora_in_comfy(model, clip, vae, rewards, config, lora_path=work / "loras" / "err.safetensors")
                out["error_raised"] = False
            except RuntimeError as err:
                out["error_raised"] = "on purpose" in str(err)
            out["reward_calls"] = handle.reward.calls
            after = _snapshot(watched)
            out["snapshot_equal"] = before == after
            out["snapshot_diff"] = [k for k in before if before[k] != after.get(k)][:5] + \
                [k for k in after if k not in before][:5]
            out["lora_layers_left"] = sum(isinstance(m, LoraLayer) for m in model.model.diffusion_model.modules())
            out["rng_unchanged"] = bool(torch.equal(rng_before, torch.random.get_rng_state()))

            # ---- gradient checkpointing: the same LoRA, and the wrappers are gone afterwards
            loras = {}
            for flag in (False, True):
                handle = type("Handle", (), {"name": "aesthetic", "reward": FailingReward(fail_at=99),
                                             "patcher": None})()
                rw = [RewardInput(handle, 1.0, "aesthetic")]
                cfg = config.model_copy(update={
                    "optim": config.optim.model_copy(update={"gradient_checkpointing": flag}),
                    "run": config.run.model_copy(update={"max_steps": 1, "output_dir": str(work / f"gc{flag}")})})
                res = train_lora_in_comfy(model, clip, vae, rw, cfg, lora_path=work / "loras" / f"gc{flag}.safetensors")
                loras[flag] = res.tensors
            out["gc_max_diff"] = max(float((loras[True][k] - loras[False][k]).abs().max()) for k in loras[True])
            out["gc_lora_size"] = max(float(v.abs().max()) for k, v in loras[True].items() if "lora_up" in k)
            out["gc_wrappers_left"] = sum("forward" in m.__dict__ for m in model.model.diffusion_model.modules())
            out["gc_snapshot_equal"] = before == _snapshot(watched)
            # ---- ImageReFL on an IMAGE batch: the VAE encodes the real images, one step trains
            from comfy_rdt_nodes.nodes_training import _write_dataset

            images = torch.rand(2, 32, 32, 3, generator=g)
            dataset = _write_dataset(work / "imgs", images, ["a cat", "a house"])
            handle = type("Handle", (), {"name": "aesthetic", "reward": FailingReward(fail_at=99), "patcher": None})()
            rw = [RewardInput(handle, 1.0, "aesthetic")]
            cfg = node_config(objective="imagerefl", prompts=[], steps=1, learning_rate=1e-3, lora_rank=2,
                              lora_alpha=2.0, k=1, sampling_steps=4, batch_size=2, grad_accumulation=1, kl_coeff=0.0,
                              l2_init_coeff=0.0, random_eta=False, seed=0, resolution=32, cfg=7.5, checkpoint_every=0,
                              gradient_checkpointing=False, rewards=rw, name="irefl",
                              output_dir=str(work / "irefl"), base_name="tiny", resume=False, dataset=dataset)
            res = train_lora_in_comfy(model, clip, vae, rw, cfg, lora_path=work / "loras" / "irefl.safetensors")
            out["imagerefl_steps"] = res.steps
            out["imagerefl_metrics"] = sorted(res.history[0]) if res.history else []
            out["imagerefl_lora_size"] = max(float(v.abs().max()) for k, v in res.tensors.items() if "lora_up" in k)
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
