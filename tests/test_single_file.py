"""Single-file (original LDM layout, ComfyUI ``models/checkpoints``) loading, offline.

Tiny SD1.5- and SDXL-architecture pipelines are written as LDM ``.safetensors`` files (``tests/ldm_checkpoint.py``)
and loaded with ``StableDiffusionBackbone.from_single_file(file, config=<diffusers dir>)`` with the network
blocked. References: the same pipeline saved in diffusers format and loaded with ``from_pretrained``, and key
names of the original Stable Diffusion checkpoints written out by hand.
"""

from __future__ import annotations

import shutil
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_checkpoint import make_tiny_sdxl_single_file_pipeline, save_ldm_checkpoint
from rdt_lib.backbones.stable_diffusion import StableDiffusionBackbone, detect_sd_kind
from rdt_lib.sampling import sample
from sd_fixtures import make_tiny_pipeline, save_tiny_sd_pipeline

PROMPTS = ["a cat", "the dog"]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: offline mode and no outgoing connections at all."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)

    def no_network(self, *args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)


def _configs_only(src: Path, dst: Path) -> Path:
    """A diffusers directory without weights: what a single-file config directory needs."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
    assert not list(dst.rglob("*.safetensors"))
    return dst


def _build(root: Path, sdxl: bool) -> SimpleNamespace:
    pipe = make_tiny_sdxl_single_file_pipeline(root / "tok", seed=0) if sdxl else make_tiny_pipeline(root / "tok")
    pipe.save_pretrained(str(root / "ref"), safe_serialization=True)
    return SimpleNamespace(
        kind="sdxl" if sdxl else "sd15",
        pipe=pipe,
        ref_dir=root / "ref",
        config_dir=_configs_only(root / "ref", root / "configs"),
        file=save_ldm_checkpoint(pipe, root / f"tiny_{'sdxl' if sdxl else 'sd15'}.safetensors"),
    )


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sf_sd15"), sdxl=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sf_sdxl"), sdxl=True)


def _load_file(m, **kwargs) -> StableDiffusionBackbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionBackbone.from_single_file(m.file, kind=m.kind, **{"config": m.config_dir, **kwargs})


def _assert_same_weights(loaded_pipe, ref_pipe):
    compared = 0
    for name in COMPONENTS:
        ref = getattr(ref_pipe, name, None)
        if ref is None:
            assert getattr(loaded_pipe, name, None) is None
            continue
        a, b = getattr(loaded_pipe, name).state_dict(), ref.state_dict()
        assert set(a) == set(b), name
        for key in b:
            assert not a[key].is_meta, f"{name}.{key} was not loaded"
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}.{key} differs"
            compared += 1
    assert compared > 300


# ---- the LDM file itself --------------------------------------------------------------------------------
def test_written_file_has_the_original_sd15_layout(sd15):
    """Key names / shapes as in the original SD1.5 checkpoints, for the tiny model's blocks (written by hand:
    2 down blocks with 1 layer each -> input_blocks 1 (resnet + attention), 2 (downsampler), 3 (resnet); the
    up blocks 0 (no attention, upsampler) and 1 (attention), 2 layers each -> output_blocks 0-1 and 2-3)."""
    sd = load_file(str(sd15.file))
    u, v, te = sd15.pipe.unet, sd15.pipe.vae, sd15.pipe.text_encoder
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": u.conv_in.weight,
        "model.diffusion_model.time_embed.2.weight": u.time_embedding.linear_2.weight,
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": u.down_blocks[0].resnets[0].conv1.weight,
        "model.diffusion_model.input_blocks.1.0.emb_layers.1.bias": u.down_blocks[0].resnets[0].time_emb_proj.bias,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            u.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": u.down_blocks[0].attentions[0].proj_in.weight,
        "model.diffusion_model.input_blocks.2.0.op.weight": u.down_blocks[0].downsamplers[0].conv.weight,
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight":
            u.down_blocks[1].resnets[0].conv_shortcut.weight,
        "model.diffusion_model.middle_block.0.out_layers.3.weight": u.mid_block.resnets[0].conv2.weight,
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
            u.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight,
        "model.diffusion_model.middle_block.2.in_layers.0.weight": u.mid_block.resnets[1].norm1.weight,
        "model.diffusion_model.output_blocks.1.0.out_layers.0.bias": u.up_blocks[0].resnets[1].norm2.bias,
        "model.diffusion_model.output_blocks.1.1.conv.weight": u.up_blocks[0].upsamplers[0].conv.weight,
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight":
            u.up_blocks[1].attentions[1].transformer_blocks[0].ff.net[2].weight,
        "model.diffusion_model.out.0.weight": u.conv_norm_out.weight,
        "model.diffusion_model.out.2.bias": u.conv_out.bias,
        "first_stage_model.encoder.down.0.downsample.conv.weight": v.encoder.down_blocks[0].downsamplers[0].conv.weight,
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight":
            v.encoder.down_blocks[1].resnets[0].conv_shortcut.weight,
        "first_stage_model.encoder.mid.block_2.conv1.weight": v.encoder.mid_block.resnets[1].conv1.weight,
        "first_stage_model.encoder.norm_out.weight": v.encoder.conv_norm_out.weight,
        # the decoder's up blocks are numbered from the lowest resolution: diffusers up_blocks.0 = LDM up.1
        "first_stage_model.decoder.up.1.upsample.conv.weight": v.decoder.up_blocks[0].upsamplers[0].conv.weight,
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
            v.decoder.up_blocks[1].resnets[0].conv_shortcut.weight,
        "first_stage_model.decoder.mid.attn_1.norm.bias": v.decoder.mid_block.attentions[0].group_norm.bias,
        "first_stage_model.quant_conv.weight": v.quant_conv.weight,
    }
    tm = getattr(te, "text_model", te)  # transformers >= 5.6 flattens CLIPTextModel
    expected["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = \
        tm.embeddings.position_embedding.weight
    expected["cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"] = \
        tm.encoder.layers[1].self_attn.q_proj.weight
    for key, value in expected.items():
        assert key in sd, key
        assert torch.equal(sd[key], value.detach()), key
    # the VAE attention is stored as 1x1 convolutions
    q = sd["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1)
    assert torch.equal(q[:, :, 0, 0], v.encoder.mid_block.attentions[0].to_q.weight.detach())
    n_model = sum(len(m.state_dict()) for m in (u, v, te))
    assert len(sd) == n_model + 2  # + betas, alphas_cumprod
    assert not any(k.startswith(("conditioner.", "down_blocks", "unet.")) for k in sd)


def test_written_file_has_the_original_sdxl_layout(sdxl):
    with safe_open(str(sdxl.file), framework="pt") as fh:
        keys = set(fh.keys())
        te2 = sdxl.pipe.text_encoder_2
        proj = fh.get_tensor("conditioner.embedders.1.model.text_projection")
        in_proj = fh.get_tensor("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
    attn = te2.text_model.encoder.layers[1].self_attn
    assert torch.equal(proj, te2.text_projection.weight.detach().T)  # open_clip: x @ text_projection
    assert torch.equal(in_proj, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach())
    for key in ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.positional_embedding",
                "conditioner.embedders.1.model.token_embedding.weight",
                "conditioner.embedders.1.model.ln_final.bias",
                "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.bias",
                "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.weight",
                "model.diffusion_model.label_emb.0.0.weight",  # SDXL's added (pooled text + size) embedding
                # SDXL layout: no attention in the first block, 2 transformer layers in the second
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_v.weight",
                "model.diffusion_model.output_blocks.0.1.transformer_blocks.1.norm3.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight"):  # upsampler after attention
        assert key in keys, key
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert not any(k.startswith("cond_stage_model.") for k in keys)


# ---- loading ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["configs_only", "other_weights"])
def test_sd15_single_file_loads_the_files_weights(sd15, tmp_path, config):
    """All tensors equal the diffusers-dir model's; with a config dir holding other weights, the file's win."""
    if config == "other_weights":
        config_dir = save_tiny_sd_pipeline(tmp_path / "other", seed=1)
    else:
        config_dir = sd15.config_dir
    bb = _load_file(sd15, config=config_dir)
    ref = StableDiffusionBackbone.from_pretrained(sd15.ref_dir)
    _assert_same_weights(bb.pipe, ref.pipe)
    assert not bb.is_sdxl
    assert bb.scheduler_config == ref.scheduler_config
    assert bb.vae.config.scaling_factor == ref.vae.config.scaling_factor
    ids = bb.pipe.tokenizer(PROMPTS, padding="max_length").input_ids
    assert ids == ref.pipe.tokenizer(PROMPTS, padding="max_length").input_ids


def test_sd15_single_file_samples_like_the_diffusers_dir(sd15):
    bb = _load_file(sd15)
    ref = StableDiffusionBackbone.from_pretrained(sd15.ref_dir)
    cond, cond_ref = bb.encode_prompts(PROMPTS), ref.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.tensors["encoder_hidden_states"], cond_ref.tensors["encoder_hidden_states"],
                               rtol=0, atol=0)
    ours = sample(bb, PROMPTS, num_steps=3, seeds=[5, 6])
    theirs = sample(ref, PROMPTS, num_steps=3, seeds=[5, 6])
    torch.testing.assert_close(ours.latents, theirs.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=1e-6)
    # and the images depend on the weights: a model with other weights gives other latents
    assert not torch.allclose(ours.latents, sample(bb, PROMPTS, num_steps=3, seeds=[7, 6]).latents)


def test_sdxl_single_file_loads_and_samples_like_the_diffusers_dir(sdxl):
    bb = _load_file(sdxl)
    ref = StableDiffusionBackbone.from_pretrained(sdxl.ref_dir)
    assert bb.is_sdxl and ref.is_sdxl
    _assert_same_weights(bb.pipe, ref.pipe)
    assert bb.zero_empty_negative == ref.zero_empty_negative
    cond, cond_ref = bb.encode_prompts(PROMPTS), ref.encode_prompts(PROMPTS)
    for name in ("encoder_hidden_states", "text_embeds"):
        torch.testing.assert_close(cond.tensors[name], cond_ref.tensors[name], rtol=0, atol=0)
    ours = sample(bb, PROMPTS, num_steps=2, seeds=[5, 6], decode=False).latents
    theirs = sample(ref, PROMPTS, num_steps=2, seeds=[5, 6], decode=False).latents
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_one_sdxl_detection_for_every_source(sd15, sdxl, tmp_path):
    """detect_sd_kind answers alike for a model and each form its weights come in; the trainer uses it too."""
    from rdt_lib.train.run import detect_checkpoint_kind

    for m in (sd15, sdxl):
        bb = _load_file(m)
        sources = [m.pipe, m.pipe.unet, m.pipe.unet.config, bb, m.file, load_file(str(m.file)), m.ref_dir,
                   m.config_dir]
        assert [detect_sd_kind(src) for src in sources] == [m.kind] * len(sources)
        assert detect_checkpoint_kind(m.file) == m.kind and bb.is_sdxl == (m.kind == "sdxl")
        ckpt = tmp_path / f"{m.kind}.ckpt"  # a pickled checkpoint with the usual "state_dict" level
        torch.save({"state_dict": {k: torch.zeros(1) for k in load_file(str(m.file))}}, ckpt)
        assert detect_sd_kind(ckpt) == m.kind
    assert (detect_sd_kind("stabilityai/stable-diffusion-xl-base-1.0"), detect_sd_kind("runwayml/sd-v1-5")) == \
        ("sdxl", "sd15")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without model_index.json"):
        detect_sd_kind(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot tell SDXL from SD1.x/2.x for a int"):
        detect_sd_kind(3)


def test_dtype_is_applied(sd15):
    bb = _load_file(sd15, dtype=torch.bfloat16)
    assert bb.network.dtype == torch.bfloat16 and bb.vae.dtype == torch.bfloat16
    ref = sd15.pipe.unet.conv_in.weight.detach().to(torch.bfloat16)
    assert torch.equal(bb.network.conv_in.weight, ref)


# ---- errors -----------------------------------------------------------------------------------------------
def test_missing_file(sd15, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionBackbone.from_single_file(tmp_path / "nope.safetensors", config=sd15.config_dir)


def test_file_that_is_not_safetensors(sd15, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        StableDiffusionBackbone.from_single_file(bad, config=sd15.config_dir)


def test_ckpt_that_is_not_a_checkpoint(sd15, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="could not load .* as a single-file sd15 checkpoint"):
        StableDiffusionBackbone.from_single_file(bad, config=sd15.config_dir)


def test_lora_file_is_not_a_checkpoint(sd15, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ValueError, match=r"not a full Stable Diffusion checkpoint.*lora_unet_down_blocks"):
        StableDiffusionBackbone.from_single_file(lora, config=sd15.config_dir)


def test_wrong_kind(sd15, sdxl):
    with pytest.raises(ValueError, match="looks like an SDXL checkpoint.*use kind='sdxl'"):
        StableDiffusionBackbone.from_single_file(sdxl.file, kind="sd15", config=sd15.config_dir)
    with pytest.raises(ValueError, match="looks like an SD1.x/2.x checkpoint.*use kind='sd15'"):
        StableDiffusionBackbone.from_single_file(sd15.file, kind="sdxl", config=sdxl.config_dir)
    with pytest.raises(ValueError, match="config directory .* is an SDXL pipeline, but kind='sd15'"):
        StableDiffusionBackbone.from_single_file(sd15.file, kind="sd15", config=sdxl.config_dir)


def test_bad_config_dir(sd15, tmp_path):
    with pytest.raises(FileNotFoundError, match="config directory .* does not exist"):
        StableDiffusionBackbone.from_single_file(sd15.file, config=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionBackbone.from_single_file(sd15.file, config=tmp_path / "empty")


def test_checkpoint_lacking_weights_is_refused(sd15, tmp_path):
    """diffusers leaves weights missing from the file uninitialised; the backbone must not train on those."""
    sd = load_file(str(sd15.file))
    del sd["model.diffusion_model.middle_block.1.proj_out.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(sd, str(partial))
    with pytest.raises(ValueError, match=r"single-file sd15 checkpoint: the checkpoint lacks weights of a component"):
        StableDiffusionBackbone.from_single_file(partial, config=sd15.config_dir)
    # a text encoder weight: diffusers returns the half-loaded model; the backbone names what is missing
    del sd["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    sd["model.diffusion_model.middle_block.1.proj_out.weight"] = sd15.pipe.unet.mid_block.attentions[0].proj_out.weight
    save_file(sd, str(partial))
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) of the text_encoder .*layers.1.mlp.fc2.bias"):
        StableDiffusionBackbone.from_single_file(partial, config=sd15.config_dir)


# ---- the trainer ------------------------------------------------------------------------------------------
def test_train_cli_from_a_single_file(tmp_path, capsys, monkeypatch):
    """``python -m rdt_lib.train`` with model.path = an LDM file trains exactly as from the diffusers dir."""
    from diffusers import StableDiffusionPipeline

    from train_fixtures import run_train_cli, tiny_sd_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir()), safety_checker=None)
    file = save_ldm_checkpoint(pipe, tmp_path / "ckpt" / "tiny.safetensors")
    config_dir = _configs_only(tiny_sd_dir(), tmp_path / "configs")

    loads = []
    original = StableDiffusionBackbone.from_single_file.__func__

    def spy(cls, path, **kwargs):
        loads.append((Path(path), kwargs.get("config")))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(StableDiffusionBackbone, "from_single_file", classmethod(spy))

    def run(out, **extra):
        run_train_cli(out, capsys, **{"run.max_steps": 1, "run.objective": "refl", **extra})
        return load_file(str(out / "lora.safetensors"))

    from_file = run(tmp_path / "out_file", **{"model.path": str(file), "model.single_file_config": str(config_dir)})
    assert loads == [(file, str(config_dir))]
    from_dir = run(tmp_path / "out_dir")
    assert len(loads) == 1
    assert set(from_file) == set(from_dir) and len(from_file) > 0
    for key in from_dir:
        torch.testing.assert_close(from_file[key], from_dir[key], rtol=0, atol=1e-6)
    init_b = [k for k in from_dir if "lora_up" in k]
    assert any(from_dir[k].abs().max() > 0 for k in init_b)  # the step changed the zero-initialised B
