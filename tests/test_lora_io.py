"""LoRA key conversion (peft <-> kohya), loading into UNets and diffusers pipelines, atomic safetensors files."""

from __future__ import annotations

import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict

from rdt_lib import lora_io
from rdt_lib.lora_io import (
    DEFAULT_TARGET_MODULES,
    kohya_metadata,
    kohya_module_name,
    kohya_to_peft_state_dict,
    load_kohya_lora_into_unet,
    load_lora_safetensors,
    peft_state_dict_to_kohya,
    save_lora_safetensors,
    unet_lora_to_kohya,
)

from sd_fixtures import make_tiny_pipeline, make_tiny_unet, save_tiny_sd_pipeline, unet_inputs

ADAPTER = "rdt"


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
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


@torch.no_grad()
def _out(unet, sdxl: bool) -> torch.Tensor:
    return unet(**unet_inputs(sdxl)).sample


@torch.no_grad()
def _merge_kohya_into(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Independent kohya semantics (as ComfyUI / A1111 apply them): W += alpha / rank * up @ down."""
    by_path = {kohya_module_name(n): m for n, m in unet.named_modules() if n}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = tensors[name + ".lora_up.weight"].double()
        alpha = float(tensors[name + ".alpha"])
        module = by_path[name]
        module.weight += (alpha / down.shape[0] * (up @ down.double())).to(module.weight.dtype)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_diffusers_load_lora_weights_matches_trained_peft_unet(tmp_path, sdxl):
    unet = _lora_unet(sdxl)
    trained = _out(unet, sdxl)
    path = save_lora_safetensors(
        tmp_path / "lora.safetensors",
        unet_lora_to_kohya(unet, ADAPTER),
        kohya_metadata(rank=4, alpha=8, extra={"objective": "draft"}),
    )
    if sdxl:
        pipe = make_tiny_pipeline(tmp_path / "tok", sdxl=True)
    else:  # a fresh pipeline read back from a diffusers directory on disk
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(save_tiny_sd_pipeline(tmp_path / "pipe")),
                                                       safety_checker=None, requires_safety_checker=False)
    base = _out(pipe.unet, sdxl)
    pipe.load_lora_weights(str(path))
    loaded = _out(pipe.unet, sdxl)
    assert (trained - base).abs().max() > 1e-2  # the LoRA does something, so equality below means something
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_kohya_keys_name_existing_diffusers_weights(sdxl):
    unet = _lora_unet(sdxl)
    kohya = unet_lora_to_kohya(unet, ADAPTER)
    base_weights = set(make_tiny_unet(sdxl=sdxl).state_dict())
    lora_modules = sorted({k.split(".lora_A.")[0] for k in get_peft_model_state_dict(unet, adapter_name=ADAPTER)
                           if ".lora_A." in k})
    assert len(lora_modules) > 0
    expected = set()
    for path in lora_modules:
        assert re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", path)
        # ComfyUI maps "lora_unet_" + (diffusers weight key without ".weight", dots -> underscores).
        assert path + ".weight" in base_weights
        name = "lora_unet_" + path.replace(".", "_")
        expected |= {name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"}
    assert set(kohya) == expected
    name = kohya_module_name(lora_modules[0])
    assert kohya[name + ".lora_down.weight"].shape[0] == 4
    assert kohya[name + ".lora_up.weight"].shape[1] == 4
    assert kohya[name + ".alpha"].shape == () and float(kohya[name + ".alpha"]) == 8.0


@pytest.mark.parametrize("uniform_alpha", [False, True])
def test_kohya_semantics_with_per_module_rank_and_alpha(uniform_alpha):
    cfg = dict(rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3.0})
    unet = _lora_unet(False, **cfg)
    trained = _out(unet, False)
    kohya = peft_state_dict_to_kohya(get_peft_model_state_dict(unet, adapter_name=ADAPTER), alpha=8, rank=4,
                                     uniform_alpha=uniform_alpha, **cfg)
    # same as reading the scales from the layers
    from_layers = unet_lora_to_kohya(unet, ADAPTER, uniform_alpha=uniform_alpha)
    assert set(from_layers) == set(kohya)
    for k in kohya:
        torch.testing.assert_close(from_layers[k], kohya[k], atol=0, rtol=0)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == ({8.0} if uniform_alpha else {8.0, 3.0})
    ranks = {v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")}
    assert ranks == {2, 4}
    fresh = make_tiny_unet()
    _merge_kohya_into(fresh, kohya)
    torch.testing.assert_close(_out(fresh, False), trained, atol=1e-4, rtol=0)


def test_rslora_scale_is_preserved():
    unet = _lora_unet(False, use_rslora=True)
    trained = _out(unet, False)
    kohya = peft_state_dict_to_kohya(get_peft_model_state_dict(unet, adapter_name=ADAPTER), alpha=8, rank=4,
                                     use_rslora=True)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}  # 8 / sqrt(4) * 4
    fresh = make_tiny_unet()
    _merge_kohya_into(fresh, kohya)
    torch.testing.assert_close(_out(fresh, False), trained, atol=1e-4, rtol=0)


def test_diffusers_agrees_with_per_module_alpha_when_folded(tmp_path):
    cfg = dict(alpha_pattern={"attn1.to_v": 3.0}, rank_pattern={"attn2.to_k": 2})
    unet = _lora_unet(False, **cfg)
    trained = _out(unet, False)
    path = save_lora_safetensors(tmp_path / "l.safetensors", unet_lora_to_kohya(unet, ADAPTER))
    pipe = make_tiny_pipeline(tmp_path / "tok")
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_out(pipe.unet, False), trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_load_kohya_lora_into_unet_matches_peft(tmp_path, sdxl):
    cfg = dict(rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3.0})
    unet = _lora_unet(sdxl, **cfg)
    trained = _out(unet, sdxl)
    path = save_lora_safetensors(tmp_path / "l.safetensors", unet_lora_to_kohya(unet, ADAPTER, uniform_alpha=False))
    fresh = make_tiny_unet(sdxl=sdxl)
    config = load_kohya_lora_into_unet(fresh, path, adapter_name="loaded")
    assert config.r == 4 and config.lora_alpha == 8.0
    assert "loaded" in fresh.peft_config
    torch.testing.assert_close(_out(fresh, sdxl), trained, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already has an adapter named 'loaded'"):
        load_kohya_lora_into_unet(fresh, path, adapter_name="loaded")
    fresh.disable_adapters()
    torch.testing.assert_close(_out(fresh, sdxl), _out(make_tiny_unet(sdxl=sdxl), sdxl))


def test_round_trip_kohya_peft_kohya_is_identity():
    unet = _lora_unet(False, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3.0})
    kohya = unet_lora_to_kohya(unet, ADAPTER, uniform_alpha=False)
    modules = [n for n, _ in make_tiny_unet().named_modules()]
    layout = kohya_to_peft_state_dict(kohya, modules)
    # the peft side equals what peft itself reports
    peft_sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    assert set(layout.state_dict) == set(peft_sd)
    for k, v in peft_sd.items():
        assert torch.equal(layout.state_dict[k], v)
    back = peft_state_dict_to_kohya(layout.state_dict, uniform_alpha=False, **layout.scale_kwargs())
    assert set(back) == set(kohya)
    for k, v in kohya.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_peft_keys_with_adapter_name_and_prefix_are_accepted():
    unet = _lora_unet(False)
    plain = peft_state_dict_to_kohya(get_peft_model_state_dict(unet, adapter_name=ADAPTER), alpha=8, rank=4)
    raw = {"unet." + k: v for k, v in unet.state_dict().items() if ".lora_" in k}  # "...lora_A.rdt.weight"
    assert any(f".lora_A.{ADAPTER}.weight" in k for k in raw)
    converted = peft_state_dict_to_kohya(raw, alpha=8, rank=4)
    assert set(converted) == set(plain)
    assert all(torch.equal(converted[k], plain[k]) for k in plain)


def test_ema_state_dict_override_and_dtype():
    unet = _lora_unet(False)
    sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    ema = {k: v * 0.5 for k, v in sd.items()}
    kohya = unet_lora_to_kohya(unet, ADAPTER, state_dict=ema, dtype=torch.float16)
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    name = kohya_module_name(key[: -len(".lora_B.weight")])
    assert kohya[name + ".lora_up.weight"].dtype == torch.float16
    assert kohya[name + ".alpha"].dtype == torch.float32
    torch.testing.assert_close(kohya[name + ".lora_up.weight"], (sd[key] * 0.5).half())


def test_conversion_errors():
    unet = _lora_unet(False)
    sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    with pytest.raises(ValueError, match="rank 4 but the configuration gives rank 8"):
        peft_state_dict_to_kohya(sd, alpha=8, rank=8)
    a_key = next(k for k in sd if k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="no lora_B weight"):
        peft_state_dict_to_kohya({a_key: sd[a_key]}, alpha=8, rank=4)
    with pytest.raises(ValueError, match="not peft LoRA weights"):
        peft_state_dict_to_kohya({**sd, "conv_in.weight": torch.zeros(1)}, alpha=8, rank=4)


def test_unmatched_kohya_keys_give_clear_errors():
    unet = _lora_unet(False)
    kohya = unet_lora_to_kohya(unet, ADAPTER)
    modules = [n for n, _ in make_tiny_unet().named_modules()]
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    typo = {k.replace(good, good.replace("attn1_to_q", "attn1_toq")): v for k, v in kohya.items()}
    with pytest.raises(ValueError, match=r"match no module(.|\n)*attn1_toq(.|\n)*closest module: " + good):
        kohya_to_peft_state_dict(typo, modules)
    with pytest.raises(ValueError, match="Text-encoder LoRA keys"):
        kohya_to_peft_state_dict({**kohya, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},
                                 modules)
    ldm = {k.replace("lora_unet_down_blocks_0_attentions_0", "lora_unet_input_blocks_1_1"): v for k, v in kohya.items()}
    with pytest.raises(ValueError, match="LDM-layout names"):
        kohya_to_peft_state_dict(ldm, modules)
    up_only = {k: v for k, v in kohya.items() if not (k.startswith(good) and k.endswith("lora_down.weight"))}
    with pytest.raises(ValueError, match="needs both lora_down.weight and lora_up.weight"):
        kohya_to_peft_state_dict(up_only, modules)
    with pytest.raises(ValueError, match="match no module"):
        load_kohya_lora_into_unet(make_tiny_unet(), typo)
    # norm layers are not Linear / Conv2d
    bad = {"lora_unet_conv_norm_out.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_conv_norm_out.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(ValueError, match="only Linear and Conv2d"):
        load_kohya_lora_into_unet(make_tiny_unet(), bad)


def test_missing_alpha_defaults_to_rank():
    modules = ["a.to_q"]
    layout = kohya_to_peft_state_dict({"lora_unet_a_to_q.lora_down.weight": torch.ones(3, 5),
                                       "lora_unet_a_to_q.lora_up.weight": torch.ones(6, 3)}, modules)
    assert layout.ranks == {"a.to_q": 3} and layout.alphas == {"a.to_q": 3.0}
    assert set(layout.state_dict) == {"a.to_q.lora_A.weight", "a.to_q.lora_B.weight"}


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
    path = tmp_path / "lora.safetensors"
    old = {"w": torch.zeros(4)}
    save_lora_safetensors(path, old, {"version": "old"})

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_lora_safetensors(path, {"w": torch.ones(4)}, {"version": "new"})
    monkeypatch.undo()
    tensors, meta = load_lora_safetensors(path)
    assert meta == {"version": "old"} and torch.equal(tensors["w"], old["w"])
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # no temporary file left behind


def test_load_into_a_plain_torch_module_uses_kohya_scale():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(4, 5)
            self.to_out = torch.nn.ModuleList([torch.nn.Linear(5, 4), torch.nn.Dropout(0.0)])

        def forward(self, x):
            return self.to_out[0](self.to_q(x))

    torch.manual_seed(0)
    net = torch.nn.Sequential(Block())
    ref = torch.nn.Sequential(Block())
    ref.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(1)
    tensors = {
        "lora_unet_0_to_q.lora_down.weight": torch.randn(2, 4, generator=g),
        "lora_unet_0_to_q.lora_up.weight": torch.randn(5, 2, generator=g),
        "lora_unet_0_to_q.alpha": torch.tensor(1.0),
        "lora_unet_0_to_out_0.lora_down.weight": torch.randn(3, 5, generator=g),
        "lora_unet_0_to_out_0.lora_up.weight": torch.randn(4, 3, generator=g),
        "lora_unet_0_to_out_0.alpha": torch.tensor(6.0),
    }
    config = load_kohya_lora_into_unet(net, tensors, adapter_name="k")
    assert sorted(config.target_modules) == ["0.to_out.0", "0.to_q"]
    _merge_kohya_into(ref, tensors)  # W += alpha / rank * up @ down: scales 0.5 and 2.0
    x = torch.randn(3, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=0)
