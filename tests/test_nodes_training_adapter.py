"""The training node's pure parts without ComfyUI: LDM <-> diffusers naming of the LoRA layers, the
diffusers-named view that attaches peft LoRA to an LDM-layout UNet, the LoRA file it exports (read back by
diffusers' ``load_lora_weights`` and by rdt_lib's reader) and the inference-tensor aliasing."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import ldm_checkpoint as ldm
import sd_fixtures
from comfy_rdt_nodes.comfy_backbone import DiffusersNamedView, autograd_usable
from comfy_rdt_nodes.unet_names import attention_lora_targets, diffusers_sort_key, ldm_block_map
from rdt_lib.lora import add_lora, lora_parameters
from rdt_lib.lora_io import load_lora, load_lora_safetensors, save_lora_safetensors, unet_lora_to_kohya

TARGET = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")


def _diffusers_targets(unet) -> list[str]:
    return [n for n, _ in unet.named_modules() if TARGET.search(n)]


class _Node(nn.Module):
    def forward(self, *a, **k):  # pragma: no cover
        raise NotImplementedError


def ldm_module_tree(unet) -> tuple[nn.Module, dict[str, str]]:
    """An LDM-layout module tree (containers + real Linear layers at the attention projections, weights copied from
    the diffusers UNet through the project's independent LDM writer), standing in for ComfyUI's diffusion_model."""
    sd = unet.state_dict()
    ldm_sd = ldm.unet_to_ldm(sd, unet.config)
    root = _Node()
    for key in ldm_sd:
        *parts, _ = key.split(".")
        node = root
        for part in parts[:-1]:
            if part not in node._modules:
                node.add_module(part, _Node())
            node = node._modules[part]
        leaf = parts[-1]
        path = ".".join(parts)
        if TARGET.search("." + path if not path.startswith(".") else path) and leaf not in node._modules:
            w = ldm_sd[path + ".weight"]
            lin = nn.Linear(w.shape[1], w.shape[0], bias=(path + ".bias") in ldm_sd)
            with torch.no_grad():
                lin.weight.copy_(w)
                if lin.bias is not None:
                    lin.bias.copy_(ldm_sd[path + ".bias"])
            node.add_module(leaf, lin)
        elif leaf not in node._modules:
            node.add_module(leaf, _Node())
    return root, ldm_sd


@pytest.mark.parametrize("sdxl", [False, True])
def test_names_match_diffusers_layout_and_order(sdxl):
    unet = sd_fixtures.make_tiny_unet(sdxl=sdxl)
    sd = unet.state_dict()
    ldm_sd = ldm.unet_to_ldm(sd, unet.config)
    pairs = attention_lora_targets(ldm_sd.keys())
    want = _diffusers_targets(unet)
    assert [d for _, d in pairs] == want  # diffusers' own named_modules order (peft's init order)
    for l_path, d_path in pairs:  # the same weights sit under both names
        assert torch.equal(ldm_sd[l_path + ".weight"], sd[d_path + ".weight"]), (l_path, d_path)
    # every transformer block is mapped, the mid block to mid_block.attentions.0
    blocks = ldm_block_map(ldm_sd.keys())
    assert blocks["middle_block.1"] == "mid_block.attentions.0"
    assert len(blocks) == len({d.split(".transformer_blocks")[0] for d in want})


def test_sort_key_orders_sections_as_diffusers_registers_them():
    names = ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
             "up_blocks.1.attentions.10.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v",
             "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k"]
    assert sorted(names, key=diffusers_sort_key) == [names[4], names[3], names[1], names[2], names[0]]


def test_unknown_targets_and_unets_without_attention_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        attention_lora_targets(["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"], ["proj_in"])
    with pytest.raises(ValueError, match="no attention"):
        attention_lora_targets(["input_blocks.1.0.in_layers.0.weight"])


@pytest.mark.parametrize("sdxl", [False, True])
def test_view_gives_the_headless_init_and_restores(sdxl):
    """add_lora through the view draws the same initial LoRA as add_lora on the diffusers UNet with the same seed,
    puts the LoRA layers into the LDM tree, and restore() puts the original layers back."""
    unet = sd_fixtures.make_tiny_unet(sdxl=sdxl)
    tree, _ = ldm_module_tree(unet)
    originals = {n: m for n, m in tree.named_modules() if TARGET.search(n)}
    view = DiffusersNamedView(tree)
    torch.manual_seed(7)
    add_lora(view, "tuned", rank=4, alpha=4.0, init_lora_weights="gaussian")
    torch.manual_seed(7)
    add_lora(unet, "tuned", rank=4, alpha=4.0, init_lora_weights="gaussian")
    ours, ref = lora_parameters(view, "tuned"), lora_parameters(unet, "tuned")
    assert list(ours) == list(ref)  # same parameter names, same order
    a_keys = [k for k in ref if "lora_A" in k]
    assert not torch.equal(ref[a_keys[0]], ref[a_keys[1]])  # the init is random, not constant
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    from peft.tuners.lora import LoraLayer

    for l_path, d_path in view.pairs:  # the LDM tree now runs the LoRA layers
        assert isinstance(tree.get_submodule(l_path), LoraLayer)
        assert tree.get_submodule(l_path) is view.get_submodule(d_path)
    view.restore()
    for name, module in originals.items():
        assert tree.get_submodule(name) is module
    assert not any(isinstance(m, LoraLayer) for m in tree.modules())


def test_exported_file_loads_in_diffusers_and_rdt_reader(tmp_path):
    """The kohya file exported from the view loads with diffusers' load_lora_weights (every layer changed by
    exactly scale * B @ A) and with rdt_lib's reader."""
    comps = sd_fixtures.make_tiny_sd_components(tmp_path / "c", sdxl=False)
    unet = comps["unet"]
    tree, _ = ldm_module_tree(unet)
    view = DiffusersNamedView(tree)
    torch.manual_seed(3)
    add_lora(view, "tuned", rank=4, alpha=2.0)
    with torch.no_grad():  # trained-looking weights: B non-zero
        for name, p in lora_parameters(view, "tuned").items():
            p.copy_(torch.randn_like(p) * 0.1)
    params = lora_parameters(view, "tuned")
    tensors = unet_lora_to_kohya(view, "tuned")
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert len(tensors) == 3 * len(view.pairs)
    path = save_lora_safetensors(tmp_path / "lora.safetensors", tensors, {"rdt_steps": "3"})

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path), adapter_name="r")
    pipe.fuse_lora(lora_scale=1.0)
    after = pipe.unet.state_dict()
    checked = 0
    for _, d_path in view.pairs:
        a = params[f"{d_path}.lora_A.tuned.weight"]
        b = params[f"{d_path}.lora_B.tuned.weight"]
        key = f"{d_path}.base_layer.weight" if f"{d_path}.base_layer.weight" in after else f"{d_path}.weight"
        delta = after[key] - before[f"{d_path}.weight"]
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(delta, 0.5 * b @ a, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len(view.pairs)

    fresh = sd_fixtures.make_tiny_unet(sdxl=False)
    load_lora(fresh, path, adapter_name="file")
    loaded = lora_parameters(fresh, "file")
    modules = dict(fresh.named_modules())
    for _, d_path in view.pairs:  # the file's effective delta (alpha folding aside) is the trained one
        scale = modules[d_path].scaling["file"]
        got = scale * loaded[f"{d_path}.lora_B.file.weight"] @ loaded[f"{d_path}.lora_A.file.weight"]
        want = 0.5 * params[f"{d_path}.lora_B.tuned.weight"] @ params[f"{d_path}.lora_A.tuned.weight"]
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-4)
    assert load_lora_safetensors(path)[1]["rdt_steps"] == "3"


def test_autograd_usable_aliases_inference_weights_and_restores_them():
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(4, 5), nn.GroupNorm(1, 5), nn.Linear(5, 2))
        net.register_buffer("scale", torch.tensor(2.0))
    originals = {k: v for k, v in list(net.named_parameters()) + list(net.named_buffers())}
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        (net(x) * net.scale).sum().backward()
    x.grad = None
    with autograd_usable([net]) as n:
        assert n == len(originals)
        w = net[0].weight
        assert not w.is_inference() and not w.requires_grad
        assert w.data_ptr() == originals["0.weight"].data_ptr()  # an alias, no copy
        (net(x) * net.scale).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # reference gradient from an ordinary copy of the network
    ref = nn.Sequential(nn.Linear(4, 5), nn.GroupNorm(1, 5), nn.Linear(5, 2))
    ref.load_state_dict({k: v.clone() for k, v in originals.items() if k != "scale"})
    x2 = x.detach().clone().requires_grad_(True)
    (ref(x2) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for k, v in list(net.named_parameters()) + list(net.named_buffers()):
        assert v is originals[k]  # the very same objects are back


def test_autograd_usable_restores_after_an_error():
    with torch.inference_mode():
        lin = nn.Linear(2, 2)
    w = lin.weight
    with pytest.raises(KeyError):
        with autograd_usable([lin]):
            raise KeyError("boom")
    assert lin.weight is w and lin.weight.is_inference()
