"""LoRA files: the kohya writer, reading LoRA files of every kind through diffusers, ComfyUI key names, file I/O.

References are independent of the code under test: the trained peft adapter's own output, kohya's formula
``W += alpha / rank * up @ down`` applied by hand, the LDM <-> diffusers UNet layout of ``tests/ldm_checkpoint.py``
(written from the original CompVis layout), and ComfyUI's ``unet_to_diffusers`` naming rule re-stated below.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from rdt_lib import lora_io
from rdt_lib.lora import use_adapters
from rdt_lib.lora_io import (
    DEFAULT_TARGET_MODULES,
    kohya_metadata,
    kohya_module_name,
    load_lora,
    load_lora_safetensors,
    peft_to_kohya,
    save_lora,
    save_lora_safetensors,
    unet_lora_to_kohya,
)

from ldm_checkpoint import unet_prefix_map, unet_to_ldm
from sd_fixtures import make_tiny_pipeline, make_tiny_unet, save_tiny_sd_pipeline, unet_inputs

ADAPTER = "rdt"
PATTERNS = dict(rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3.0})
SDXL_IDS = dict(argnames="sdxl", argvalues=[False, True], ids=["sd15", "sdxl"])


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core box are ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _lora_unet(sdxl: bool, **config_kwargs):
    """Tiny UNet with a peft LoRA whose B weights are random (so the LoRA changes the output)."""
    unet = make_tiny_unet(sdxl=sdxl)
    kwargs = dict(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights="gaussian")
    kwargs.update(config_kwargs)
    unet.add_adapter(LoraConfig(**kwargs), adapter_name=ADAPTER)
    _randomize_lora_b(unet)
    return unet


def _randomize_lora_b(model, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def _out(unet, sdxl: bool) -> torch.Tensor:
    return unet(**unet_inputs(sdxl)).sample


@torch.no_grad()
def _merge_kohya_into(model, tensors, names) -> None:
    """kohya semantics (as ComfyUI / A1111 apply them): W += alpha / rank * up @ down; alpha defaults to rank."""
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = tensors[name + ".lora_up.weight"].double()
        rank = down.shape[0]
        alpha = float(tensors[name + ".alpha"]) if name + ".alpha" in tensors else float(rank)
        module = names[name]
        delta = up.flatten(1) @ down.double().flatten(1)
        module.weight += (alpha / rank * delta).reshape(module.weight.shape).to(module.weight.dtype)


def _kohya_names(model, prefix: str = "lora_unet_") -> dict:
    return {prefix + n.replace(".", "_"): m for n, m in model.named_modules() if n}


def _fresh_pipeline(tmp_path, sdxl: bool):
    return make_tiny_pipeline(tmp_path / "tok", sdxl=sdxl)


# --------------------------------------------------------------------------------------------------
# the written file


@pytest.mark.parametrize(**SDXL_IDS)
def test_written_file_round_trips_through_diffusers_load_lora_weights(tmp_path, sdxl):
    unet = _lora_unet(sdxl, **PATTERNS)  # per-module ranks and alphas: the alpha handling matters
    trained = _out(unet, sdxl)
    path = save_lora(unet, tmp_path / "lora.safetensors", ADAPTER, metadata={"rdt_objective": "draft"})
    if sdxl:
        pipe = _fresh_pipeline(tmp_path, True)
    else:  # a fresh pipeline read back from a diffusers directory on disk
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(save_tiny_sd_pipeline(tmp_path / "pipe")),
                                                       safety_checker=None, requires_safety_checker=False)
    base = _out(pipe.unet, sdxl)
    pipe.load_lora_weights(str(path))
    loaded = _out(pipe.unet, sdxl)
    assert (trained - base).abs().max() > 1e-2  # the LoRA does something, so equality below means something
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    _, meta = load_lora_safetensors(path)
    assert meta["rdt_objective"] == "draft" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"


@pytest.mark.parametrize("uniform_alpha", [False, True])
def test_written_file_has_kohya_semantics(uniform_alpha):
    """What ComfyUI / A1111 compute from the file (each module's own alpha) equals the trained adapter."""
    unet = _lora_unet(False, **PATTERNS)
    trained = _out(unet, False)
    kohya = unet_lora_to_kohya(unet, ADAPTER, uniform_alpha=uniform_alpha)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == ({8.0} if uniform_alpha else {8.0, 3.0})
    assert {v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")} == {2, 4}
    assert all(v.dtype == torch.float32 and v.shape == () for k, v in kohya.items() if k.endswith(".alpha"))
    fresh = make_tiny_unet()
    _merge_kohya_into(fresh, kohya, _kohya_names(fresh))
    torch.testing.assert_close(_out(fresh, False), trained, atol=1e-5, rtol=0)


def test_rslora_scale_is_preserved():
    unet = _lora_unet(False, use_rslora=True)
    trained = _out(unet, False)
    kohya = unet_lora_to_kohya(unet, ADAPTER)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}  # 8 / sqrt(4) * 4
    fresh = make_tiny_unet()
    _merge_kohya_into(fresh, kohya, _kohya_names(fresh))
    torch.testing.assert_close(_out(fresh, False), trained, atol=1e-5, rtol=0)


def test_ema_state_dict_with_parameter_names_and_dtype():
    """The trainer passes EMA weights keyed by parameter name (``...lora_A.<adapter>.weight``)."""
    unet = _lora_unet(False)
    sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    ema = {k: p.detach() * 0.5 for k, p in unet.named_parameters() if f".{ADAPTER}." in k}
    assert any(f".lora_B.{ADAPTER}.weight" in k for k in ema)
    kohya = unet_lora_to_kohya(unet, ADAPTER, state_dict=ema, dtype=torch.float16)
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    name = kohya_module_name(key[: -len(".lora_B.weight")])
    assert kohya[name + ".lora_up.weight"].dtype == torch.float16
    assert kohya[name + ".alpha"].dtype == torch.float32 and float(kohya[name + ".alpha"]) == 8.0
    torch.testing.assert_close(kohya[name + ".lora_up.weight"], (sd[key] * 0.5).half())
    assert len(kohya) == 3 * len(sd) // 2


def test_writer_errors():
    unet = _lora_unet(False)
    sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    a_key = next(k for k in sd if k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="no lora_B weight"):
        peft_to_kohya({a_key: sd[a_key]}, 1.0)
    with pytest.raises(ValueError, match="not peft LoRA weights"):
        peft_to_kohya({**sd, "conv_in.weight": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="no LoRA scale given"):
        peft_to_kohya(sd, {})
    with pytest.raises(ValueError, match="has no LoRA adapter 'other'"):
        unet_lora_to_kohya(unet, "other", state_dict=sd)


# --------------------------------------------------------------------------------------------------
# ComfyUI key names


def _comfy_unet_config(config) -> dict:
    """ComfyUI's UNet description (``comfy.model_detection``) of a diffusers UNet2DConditionModel config."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    tlpb = config["transformer_layers_per_block"]
    tlpb = [tlpb] * n if isinstance(tlpb, int) else list(tlpb)
    down, up = config["down_block_types"], config["up_block_types"]
    return {
        "num_res_blocks": [lpb] * n,
        "channel_mult": list(range(n)),
        "transformer_depth": [tlpb[x] if "CrossAttn" in down[x] else 0 for x in range(n) for _ in range(lpb)],
        "transformer_depth_output": [tlpb[x] if "CrossAttn" in up[n - 1 - x] else 0
                                     for x in range(n) for _ in range(lpb + 1)],
        "transformer_depth_middle": tlpb[-1],
    }


_TRANSFORMER_PARTS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
_RESNET_PARTS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                 "conv_shortcut": "skip_connection"}
_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2"}


def comfy_unet_to_diffusers(c: dict) -> dict[str, str]:
    """ComfyUI's ``comfy.utils.unet_to_diffusers`` rule for the weights LoRA can patch: diffusers module -> LDM
    module. Restated from its documented form (ComfyUI 0.3.64): resnets at ``input_blocks.n.0`` /
    ``output_blocks.n.0``, transformers at ``.1``, downsamplers ``input_blocks.n.0.op``, upsamplers after the
    last layer of an up block, middle block ``0 / 1 / 2``; ``lora_unet_<diffusers path with underscores>``
    names are then mapped to these weights (``comfy.lora.model_lora_keys_unet``)."""
    out: dict[str, str] = dict(_BASIC)
    res, depth, depth_out = c["num_res_blocks"], list(c["transformer_depth"]), list(c["transformer_depth_output"])
    for x in range(len(c["channel_mult"])):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            for d, ldm in _RESNET_PARTS.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{ldm}"
            t = depth.pop(0)
            if t:
                for part in ("proj_in", "proj_out"):
                    out[f"down_blocks.{x}.attentions.{i}.{part}"] = f"input_blocks.{n}.1.{part}"
                for j in range(t):
                    for part in _TRANSFORMER_PARTS:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{part}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{j}.{part}"
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    for part in ("proj_in", "proj_out"):
        out[f"mid_block.attentions.0.{part}"] = f"middle_block.1.{part}"
    for j in range(c["transformer_depth_middle"]):
        for part in _TRANSFORMER_PARTS:
            out[f"mid_block.attentions.0.transformer_blocks.{j}.{part}"] = f"middle_block.1.transformer_blocks.{j}.{part}"
    for i, n in enumerate([0, 2]):
        for d, ldm in _RESNET_PARTS.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{ldm}"
    res = list(reversed(res))
    for x in range(len(c["channel_mult"])):
        n = (res[x] + 1) * x
        for i in range(res[x] + 1):
            c_idx = 1
            for d, ldm in _RESNET_PARTS.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{ldm}"
            t = depth_out.pop()
            if t:
                c_idx += 1
                for part in ("proj_in", "proj_out"):
                    out[f"up_blocks.{x}.attentions.{i}.{part}"] = f"output_blocks.{n}.1.{part}"
                for j in range(t):
                    for part in _TRANSFORMER_PARTS:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{part}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{j}.{part}"
            if i == res[x]:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c_idx}.conv"
            n += 1
    return out


def _written_names(tensors) -> set[str]:
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert {k[len(n):] for n in names for k in tensors if k.startswith(n + ".")} == \
        {".lora_down.weight", ".lora_up.weight", ".alpha"}
    return names


def _all_lora_modules(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize(**SDXL_IDS)
def test_every_written_key_is_mapped_by_comfyui_to_a_weight_of_its_shape(sdxl):
    unet = _lora_unet(sdxl, target_modules=_all_lora_modules(make_tiny_unet(sdxl=sdxl)))
    kohya = unet_lora_to_kohya(unet, ADAPTER)
    comfy = {kohya_module_name(d): ldm for d, ldm in comfy_unet_to_diffusers(_comfy_unet_config(unet.config)).items()}
    ldm_weights = unet_to_ldm(make_tiny_unet(sdxl=sdxl).state_dict(), unet.config)  # the checkpoint ComfyUI loads
    names = _written_names(kohya)
    assert len(names) == len(_all_lora_modules(make_tiny_unet(sdxl=sdxl))) > 20
    unmapped = sorted(names - set(comfy))
    assert unmapped == []
    for name in names:
        weight = ldm_weights[comfy[name] + ".weight"]
        up, down = kohya[name + ".lora_up.weight"], kohya[name + ".lora_down.weight"]
        assert (up.flatten(1) @ down.flatten(1)).numel() == weight.numel(), name
        assert up.shape[0] == weight.shape[0] and down.shape[1:] == weight.shape[1:], name


FULL_SIZE = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("arch", sorted(FULL_SIZE))
def test_full_size_unet_names_are_mapped_by_comfyui(arch):
    """Real SD1.5 / SDXL UNet layouts (built on the meta device): every Linear / Conv2d as a written LoRA name."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_SIZE[arch])
    modules = _all_lora_modules(unet)
    fake = {f"{m}.lora_{ab}.weight": torch.zeros(1, 1) for m in modules for ab in "AB"}
    names = _written_names(peft_to_kohya(fake, 1.0))
    comfy = {kohya_module_name(d) for d in comfy_unet_to_diffusers(_comfy_unet_config(unet.config))}
    assert len(names) == len(modules) > 250
    assert sorted(names - comfy) == []


_COMFY_SCRIPT = r'''
import json, logging, sys
comfy_dir, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import load_file, save_file
import comfy.lora, comfy.model_detection

not_loaded = []
class Catch(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "lora key not loaded" in msg:
            not_loaded.append(msg)
logging.getLogger().addHandler(Catch())

base = load_file(work + "/base.safetensors")  # diffusion_model.<LDM key>, as ComfyUI's model.state_dict()
lora = load_file(work + "/lora.safetensors")
unet_config = comfy.model_detection.detect_unet_config(base, "diffusion_model.")

class ModelConfig:
    pass

class Model:  # what model_lora_keys_unet reads of a BaseModel: state_dict() and model_config.unet_config
    model_config = ModelConfig()
    def state_dict(self):
        return base

Model.model_config.unet_config = unet_config
key_map = comfy.lora.model_lora_keys_unet(Model(), {})
patches = comfy.lora.load_lora(lora, key_map)
patched = {k: comfy.lora.calculate_weight([(1.0, p, 1.0, None, None)], base[k].clone().float(), k)
           for k, p in patches.items()}
save_file(patched, work + "/patched.safetensors")
json.dump({"not_loaded": not_loaded, "unet_config": {k: v for k, v in unet_config.items() if "depth" in k or
           k in ("num_res_blocks", "channel_mult")}}, open(work + "/result.json", "w"))
'''


@pytest.mark.comfyui
@pytest.mark.parametrize(**SDXL_IDS)
def test_real_comfyui_applies_every_written_key_with_the_adapters_effect(tmp_path, sdxl):
    """ComfyUI's own LoRA code (key map, loader, weight patching) on the written file, in ComfyUI's Python."""
    import subprocess

    from safetensors.torch import load_file

    comfy_dir, comfy_python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    if not comfy_dir or not comfy_python:
        pytest.skip("needs a ComfyUI tree: eval \"$(bash scripts/comfyui_host.sh)\" (COMFYUI_DIR, COMFYUI_PYTHON)")
    targets = _all_lora_modules(make_tiny_unet(sdxl=sdxl))
    unet = _lora_unet(sdxl, target_modules=targets, **PATTERNS)
    save_lora(unet, tmp_path / "lora.safetensors", ADAPTER)
    fresh = make_tiny_unet(sdxl=sdxl)
    save_file({"diffusion_model." + k: v.contiguous() for k, v in unet_to_ldm(fresh.state_dict(), fresh.config).items()},
              str(tmp_path / "base.safetensors"))
    (tmp_path / "comfy_lora_check.py").write_text(_COMFY_SCRIPT)
    run = subprocess.run([comfy_python, str(tmp_path / "comfy_lora_check.py"), comfy_dir, str(tmp_path)],
                         cwd=comfy_dir, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["not_loaded"] == []
    ours = _comfy_unet_config(unet.config)
    assert {k: result["unet_config"][k] for k in ours if k != "channel_mult"} == \
        {k: v for k, v in ours.items() if k != "channel_mult"}
    patched = load_file(str(tmp_path / "patched.safetensors"))
    layers = dict(unet.named_modules())
    expected = {f"{m}.weight": layers[m].base_layer.weight + layers[m].get_delta_weight(ADAPTER) for m in targets}
    expected = {"diffusion_model." + k: v for k, v in unet_to_ldm(expected, unet.config).items()}
    assert set(patched) == set(expected) and len(patched) == len(targets)
    for key, weight in expected.items():
        torch.testing.assert_close(patched[key], weight.detach(), atol=1e-5, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize(**SDXL_IDS)
def test_load_lora_gives_the_trained_adapter_switchable_per_call(tmp_path, sdxl):
    from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone

    unet = _lora_unet(sdxl, **PATTERNS)
    trained = _out(unet, sdxl)
    path = save_lora(unet, tmp_path / "lora.safetensors", ADAPTER)
    backbone = StableDiffusionBackbone(_fresh_pipeline(tmp_path, sdxl))
    base = _out(backbone.network, sdxl)
    info = load_lora(backbone, path, "loaded")
    assert info.adapter_name == "loaded" and info.file_format == "kohya"
    assert info.modules == {"unet": len(unet_lora_to_kohya(unet, ADAPTER)) // 3}
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(_out(backbone.network, sdxl), trained, atol=1e-5, rtol=0)
    with use_adapters(backbone.network, None):
        torch.testing.assert_close(_out(backbone.network, sdxl), base, atol=0, rtol=0)
    with use_adapters(backbone.network, "loaded"):
        torch.testing.assert_close(_out(backbone.network, sdxl), trained, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already has an adapter named 'loaded'"):
        load_lora(backbone, path, "loaded")


def _known_kohya_delta(unet, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """A LoRA another tool could have written: module path -> (down, up, alpha or None), alphas varying."""
    g = torch.Generator().manual_seed(seed)
    targets = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n]
    targets += [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and ".resnets." in n][:3]
    assert any(t.startswith("mid_block.") for t in targets) and any(t.startswith("up_blocks.") for t in targets)
    delta = {}
    for i, path in enumerate(targets):
        w = dict(unet.named_modules())[path].weight
        rank = 2 + i % 3
        down = torch.randn((rank,) + tuple(w.shape[1:]), generator=g) * 0.3
        up = torch.randn((w.shape[0], rank) + (1, 1) * (w.ndim == 4), generator=g) * 0.3
        alpha = [None, 1.0, 4.0, 0.5][i % 4]  # None: no .alpha key (kohya default alpha = rank)
        delta[path] = (down, up, alpha)
    return delta


def _kohya_file(delta, rename=lambda path: path) -> dict[str, torch.Tensor]:
    out = {}
    for path, (down, up, alpha) in delta.items():
        name = "lora_unet_" + rename(path).replace(".", "_")
        out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = down, up
        if alpha is not None:
            out[name + ".alpha"] = torch.tensor(alpha)
    return out


@torch.no_grad()
def _apply_delta(unet, delta) -> None:
    modules = dict(unet.named_modules())
    for path, (down, up, alpha) in delta.items():
        w = modules[path].weight
        scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
        w += (scale * up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape).to(w.dtype)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize(**SDXL_IDS)
def test_kohya_file_of_another_tool_loads_with_its_known_delta(tmp_path, sdxl, layout):
    pipe = _fresh_pipeline(tmp_path, sdxl)
    delta = _known_kohya_delta(pipe.unet)
    if layout == "ldm":  # lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q ... (original SD layout)
        ldm_of = {d: l for d, l, _ in unet_prefix_map(pipe.unet.config)}

        def rename(path):
            prefix = max((d for d in ldm_of if path.startswith(d + ".")), key=len)
            rest = path[len(prefix) + 1:]
            resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                      "conv_shortcut": "skip_connection"}
            return f"{ldm_of[prefix]}.{resnet.get(rest, rest)}"
    else:
        rename = lambda path: path  # noqa: E731
    tensors = _kohya_file(delta, rename)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors) == (layout == "ldm")
    path = tmp_path / "other_tool.safetensors"
    save_file(tensors, str(path))
    base = _out(pipe.unet, sdxl)
    info = load_lora(pipe, path, "other")
    assert info.modules == {"unet": len(delta)} and info.file_format == "kohya"
    reference = make_tiny_unet(sdxl=sdxl)
    _apply_delta(reference, delta)
    expected = _out(reference, sdxl)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(_out(pipe.unet, sdxl), expected, atol=1e-5, rtol=0)


def _peft_model_with_patterns(sdxl: bool):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights="gaussian",
                        use_rslora=True, **PATTERNS)
    model = get_peft_model(make_tiny_unet(sdxl=sdxl), config)
    _randomize_lora_b(model)
    return model, config


@pytest.mark.parametrize(**SDXL_IDS)
def test_peft_adapter_folder_loads_with_its_config(tmp_path, sdxl):
    model, _ = _peft_model_with_patterns(sdxl)
    trained = _out(model.base_model.model, sdxl)
    model.save_pretrained(str(tmp_path / "adapter"))  # adapter_model.safetensors + adapter_config.json
    keys = load_lora_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")[0]
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    pipe = _fresh_pipeline(tmp_path, sdxl)
    base = _out(pipe.unet, sdxl)
    info = load_lora(pipe, tmp_path / "adapter", "peft")
    assert info.file_format == "peft" and info.modules == {"unet": len(keys) // 2}
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(_out(pipe.unet, sdxl), trained, atol=1e-5, rtol=0)


def test_diffusers_lora_file_with_adapter_metadata_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    model, config = _peft_model_with_patterns(False)
    trained = _out(model.base_model.model, False)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "dl"), unet_lora_layers=get_peft_model_state_dict(model.base_model.model),
        unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    path = tmp_path / "dl" / "pytorch_lora_weights.safetensors"
    tensors, meta = load_lora_safetensors(path)
    assert all(k.startswith("unet.") for k in tensors) and "lora_adapter_metadata" in meta
    pipe = _fresh_pipeline(tmp_path, False)
    load_lora(pipe, path, "dl")
    torch.testing.assert_close(_out(pipe.unet, False), trained, atol=1e-5, rtol=0)


def test_bare_peft_keys_load_at_scale_one(tmp_path):
    """Without a config diffusers' convention holds: W + lora_B @ lora_A."""
    unet = make_tiny_unet()
    g = torch.Generator().manual_seed(5)
    delta = {}
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "mid_block.attentions.0.transformer_blocks.0.ff.net.2"):
        w = dict(unet.named_modules())[path].weight
        delta[path] = (torch.randn(3, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 3, generator=g) * 0.3,
                       3.0)
    tensors = {}
    for path, (down, up, _) in delta.items():
        tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = down, up
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    info = load_lora(unet, tmp_path / "bare.safetensors", "bare")  # a UNet alone is a target too
    assert info.modules == {"unet": 2} and info.file_format == "peft"
    reference = make_tiny_unet()
    _apply_delta(reference, delta)
    torch.testing.assert_close(_out(unet, False), _out(reference, False), atol=1e-5, rtol=0)


def _text_encoder_delta(text_encoder, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for n, m in text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and re.search(r"layers\.0\.(self_attn\.(q|v)_proj|mlp\.fc1)$", n):
            delta[n] = (torch.randn(2, m.in_features, generator=g) * 0.5, torch.randn(m.out_features, 2, generator=g),
                        1.0)
    assert len(delta) == 3
    return delta


def _kohya_te_keys(delta, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, (down, up, alpha) in delta.items():
        hf = path if path.startswith("text_model.") else "text_model." + path  # kohya names use HF CLIP paths
        name = prefix + hf.replace(".", "_")
        out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = down, up
        out[name + ".alpha"] = torch.tensor(alpha)
    return out


@torch.no_grad()
def _encode(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 6, 7, 2] + [1] * 4])
    return text_encoder(ids).last_hidden_state


@pytest.mark.parametrize(**SDXL_IDS)
def test_text_encoder_keys_load_into_the_pipeline_and_are_reported_for_a_unet(tmp_path, sdxl):
    pipe = _fresh_pipeline(tmp_path, sdxl)
    unet_delta = _known_kohya_delta(pipe.unet)
    encoders = {"text_encoder": "lora_te1_" if sdxl else "lora_te_"}
    if sdxl:
        encoders["text_encoder_2"] = "lora_te2_"
    te_deltas = {name: _text_encoder_delta(getattr(pipe, name), seed=i) for i, name in enumerate(encoders)}
    tensors = _kohya_file(unet_delta)
    for name, prefix in encoders.items():
        tensors.update(_kohya_te_keys(te_deltas[name], prefix))
    path = tmp_path / "with_te.safetensors"
    save_file(tensors, str(path))

    fresh = _fresh_pipeline(tmp_path, sdxl)
    with pytest.raises(ValueError, match=r"text-encoder weight\(s\).*only a UNet was given"):
        load_lora(fresh.unet, path, "te")
    assert not any("lora_" in n for n, _ in fresh.unet.named_modules())  # nothing half-loaded
    info = load_lora(fresh.unet, path, "te", text_encoders=False)
    assert info.modules == {"unet": len(unet_delta)} and len(info.skipped) == len(tensors) - len(_kohya_file(unet_delta))

    info = load_lora(pipe, path, "te")
    assert info.modules == {"unet": len(unet_delta), **{name: 3 for name in encoders}}
    for name in encoders:
        reference = _fresh_pipeline(tmp_path, sdxl)
        base = _encode(getattr(reference, name))
        _apply_delta(getattr(reference, name), te_deltas[name])
        expected = _encode(getattr(reference, name))
        assert (expected - base).abs().max() > 1e-2
        torch.testing.assert_close(_encode(getattr(pipe, name)), expected, atol=1e-5, rtol=0)


def test_load_errors_are_clear_and_leave_the_model_unchanged(tmp_path):
    unet = make_tiny_unet()
    base = _out(unet, False)
    good = _kohya_file(_known_kohya_delta(unet))
    typo = {k.replace("attn1_to_q", "attn1_toq"): v for k, v in good.items()}
    save_file(typo, str(tmp_path / "typo.safetensors"))
    with pytest.raises(ValueError, match=r"did not all reach a module.*no UNet module \['down_blocks.0.attentions.0."
                                         r"transformer_blocks.0.attn1.toq'.*Nothing was loaded"):
        load_lora(unet, tmp_path / "typo.safetensors", "typo")
    assert not any("lora_" in n for n, _ in unet.named_modules())
    torch.testing.assert_close(_out(unet, False), base, atol=0, rtol=0)
    # an SDXL LoRA into an SD1.5 UNet
    sdxl = _lora_unet(True)
    save_lora(sdxl, tmp_path / "xl.safetensors", ADAPTER)
    with pytest.raises(ValueError, match="does not fit this sd15 model.*size mismatch.*Nothing was loaded"):
        load_lora(unet, tmp_path / "xl.safetensors", "xl")
    assert not any("lora_" in n for n, _ in unet.named_modules())
    nowhere = {k.replace("lora_unet_", "lora_unet_x"): v for k, v in good.items()}
    with pytest.raises(ValueError, match="no LoRA weight matches a module of this sd15 model"):
        load_lora(unet, nowhere, "nowhere")
    assert not any("lora_" in n for n, _ in unet.named_modules())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora(unet, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_lora(unet, tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file" * 20)
    with pytest.raises(ValueError, match="not a readable .safetensors LoRA file"):
        load_lora(unet, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="needs both lora_down.weight and lora_up.weight"):
        load_lora(unet, {k: v for k, v in good.items() if not k.endswith("lora_up.weight")})
    with pytest.raises(TypeError, match="needs a StableDiffusionBackbone"):
        load_lora(torch.nn.Linear(2, 2), good)


# --------------------------------------------------------------------------------------------------
# files


def test_safetensors_save_load_round_trip(tmp_path):
    tensors = {"x.lora_down.weight": torch.randn(2, 3), "x.alpha": torch.tensor(2.0)}
    meta = kohya_metadata(rank=2, alpha=2.0, base_model_version="sdxl_base_v1-0", extra={"steps": 5, "objective": "refl"})
    path = save_lora_safetensors(tmp_path / "sub" / "out.safetensors", tensors, meta)
    loaded, loaded_meta = load_lora_safetensors(path)
    assert loaded_meta == meta and loaded_meta["steps"] == "5" and loaded_meta["ss_network_dim"] == "2"
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert load_lora_safetensors(save_lora_safetensors(tmp_path / "nometa.safetensors", tensors))[1] == {}
    with pytest.raises(TypeError, match="'steps': int 5"):
        save_lora_safetensors(tmp_path / "bad.safetensors", tensors, {"steps": 5})
    assert not (tmp_path / "bad.safetensors").exists()


def test_safetensors_save_is_atomic(tmp_path, monkeypatch):
    from rdt_lib import atomic_io

    path = tmp_path / "lora.safetensors"
    old = {"w": torch.zeros(4)}
    save_lora_safetensors(path, old, {"version": "old"})

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_lora_safetensors(path, {"w": torch.ones(4)}, {"version": "new"})
    monkeypatch.undo()
    tensors, meta = load_lora_safetensors(path)
    assert meta == {"version": "old"} and torch.equal(tensors["w"], old["w"])
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # no temporary file left behind


def test_save_lora_metadata(tmp_path):
    unet = _lora_unet(False, **PATTERNS)
    path = save_lora(unet, tmp_path / "m.safetensors", ADAPTER, base_model_version="sd_v1",
                     metadata={"rdt_rewards": json.dumps([{"name": "aesthetic"}]), "ss_steps": 3})
    _, meta = load_lora_safetensors(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "3"
    assert json.loads(meta["rdt_rewards"]) == [{"name": "aesthetic"}]
    assert lora_io.load_lora_safetensors(path)[0].keys() == unet_lora_to_kohya(unet, ADAPTER).keys()


@pytest.mark.parametrize("family, expected", [("sd15", "sd_v1"), ("sdxl", "sdxl_base_v1-0"), ("sd3", "sd3")])
def test_save_lora_records_the_base_model_version_of_its_network(tmp_path, family, expected):
    """kohya's ``ss_base_model_version`` follows the network the adapter sits on (A1111 / ComfyUI managers read it)."""
    from rdt_lib.lora import add_lora

    if family == "sd3":
        from flow_fixtures import make_tiny_sd3_transformer
        from rdt_lib.backbones.flow import FLOW_LORA_TARGETS

        network, targets = make_tiny_sd3_transformer(), list(FLOW_LORA_TARGETS)
    else:
        network, targets = make_tiny_unet(sdxl=family == "sdxl"), ["to_q", "to_k", "to_v", "to_out.0"]
    add_lora(network, "tuned", rank=2, alpha=2, target_modules=targets)
    path = lora_io.save_lora(network, tmp_path / "lora.safetensors", "tuned")
    _, meta = lora_io.load_lora_safetensors(path)
    assert meta["ss_base_model_version"] == expected
    explicit = lora_io.save_lora(network, tmp_path / "explicit.safetensors", "tuned", base_model_version="custom")
    assert lora_io.load_lora_safetensors(explicit)[1]["ss_base_model_version"] == "custom"
