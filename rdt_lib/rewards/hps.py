"""HPSv2 / HPSv2.1: an open_clip ViT-H-14 checkpoint mapped onto transformers' ``CLIPModel``.

No ``open-clip-torch`` or ``hpsv2`` import: the open_clip state dict (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ``ln_final``,
``text_projection``, ...) is renamed and the fused ``in_proj`` attention weights are split into q/k/v.

Semantics kept from open_clip: GELU (ViT-H-14 is not a quick_gelu model), pre-LN blocks, CLS-token image
pooling after ``ln_post``, causal text mask, text pooling at the highest token id (end of text), projections
as ``x @ proj`` (so transformers' ``Linear`` weight is ``proj.T``).

Score: ``100 * cos(image, text)`` (the HPS benchmark's units; v2.1 gives about 25..32 on SD images). Official
preprocessing: longest side to 224 bicubic, zero-pad to a square, OpenAI mean/std. HPSv2 and v2.1 scores are not
comparable with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .clip_rewards import VIT_H_PROCESSOR_REPO, ClipSimilarityReward, load_clip_tokenizer
from .errors import RewardCheckpointError
from .preprocess import ImagePreprocess
from .weights import (
    check_keys,
    count_indexed,
    existing_path,
    extract_state_dict,
    find_weight_file,
    hub_file,
    load_checkpoint,
    materialise_position_ids,
    require_keys,
    strip_prefix,
)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"

#: open_clip's ViT-H-14 settings that cannot be read from tensor shapes.
VIT_H_14_HEADS = {"vision_head_width": 80, "text_heads": 16, "quick_gelu": False}

# Buffers open_clip may have saved that have no parameter counterpart.
_IGNORED_SOURCE_KEYS = {"attn_mask", "visual.attn_mask"}

_BLOCK_RENAMES = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)


def read_open_clip_config(directory: Path | None) -> dict | None:
    """``model_cfg`` of an ``open_clip_config.json`` (hub layout) in ``directory``, if there is one."""
    if directory is None or not (directory / OPEN_CLIP_CONFIG_FILE).is_file():
        return None
    cfg = json.loads((directory / OPEN_CLIP_CONFIG_FILE).read_text())
    return cfg.get("model_cfg", cfg)


def clip_config_from_open_clip(state_dict: dict, model_cfg: dict | None = None, *, path: Path = Path("?")):
    """transformers ``CLIPConfig`` for an open_clip ViT state dict.

    Sizes come from tensor shapes; head counts and activation come from ``model_cfg`` (an open_clip model config,
    e.g. ``{"embed_dim":..., "vision_cfg": {"head_width": 80, ...}, "text_cfg": {"heads": 16, ...}}``) or, when it
    is None, from open_clip's ViT-H-14 config.
    """
    from transformers import CLIPConfig

    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_fc.weight"]
    require_keys(state_dict, required, path=path, what="an open_clip ViT CLIP state dict")
    vision_cfg = (model_cfg or {}).get("vision_cfg", {})
    text_cfg = (model_cfg or {}).get("text_cfg", {})
    quick_gelu = bool((model_cfg or {}).get("quick_gelu", VIT_H_14_HEADS["quick_gelu"]))
    head_width = vision_cfg.get("head_width", 64 if model_cfg else VIT_H_14_HEADS["vision_head_width"])
    text_heads = text_cfg.get("heads", 8 if model_cfg else VIT_H_14_HEADS["text_heads"])

    conv = state_dict["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    t_vocab, t_width = state_dict["token_embedding.weight"].shape
    embed_dim = state_dict["visual.proj"].shape[1]
    if v_width % head_width or t_width % text_heads:
        raise RewardCheckpointError(
            f"checkpoint {str(path)!r}: vision width {v_width} is not a multiple of head width {head_width}, or "
            f"text width {t_width} not a multiple of {text_heads} heads; give the right {OPEN_CLIP_CONFIG_FILE}"
        )
    act = "quick_gelu" if quick_gelu else "gelu"
    text = dict(
        vocab_size=int(t_vocab),
        hidden_size=int(t_width),
        intermediate_size=int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=count_indexed(state_dict, r"transformer\.resblocks\.(\d+)\."),
        num_attention_heads=int(text_heads),
        max_position_embeddings=int(state_dict["positional_embedding"].shape[0]),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=int(embed_dim),
        bos_token_id=int(t_vocab) - 2,
        eos_token_id=int(t_vocab) - 1,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=int(v_width),
        intermediate_size=int(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=count_indexed(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."),
        num_attention_heads=int(v_width // head_width),
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=int(embed_dim),
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(embed_dim))


def open_clip_to_transformers(state_dict: dict, num_vision_layers: int, num_text_layers: int):
    """Rename an open_clip CLIP state dict to transformers ``CLIPModel`` names.

    Returns ``(mapped, consumed)``: the new state dict and the set of source keys used.
    """
    mapped: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()

    def take(src: str, dst: str, fn=lambda t: t) -> None:
        if src in state_dict:
            mapped[dst] = fn(state_dict[src])
            consumed.add(src)

    def blocks(src_prefix: str, dst_prefix: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src_prefix}transformer.resblocks.{i}.", f"{dst_prefix}encoder.layers.{i}."
            for a, b in _BLOCK_RENAMES:
                take(s + a, d + b)
            for kind in ("weight", "bias"):
                src = s + f"attn.in_proj_{kind}"
                if src in state_dict:
                    q, k, v = state_dict[src].chunk(3, dim=0)
                    mapped[d + f"self_attn.q_proj.{kind}"] = q
                    mapped[d + f"self_attn.k_proj.{kind}"] = k
                    mapped[d + f"self_attn.v_proj.{kind}"] = v
                    consumed.add(src)

    # image tower
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("visual.class_embedding", "vision_model.embeddings.class_embedding", lambda t: t.reshape(-1))
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    take("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight")
    take("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias")
    blocks("visual.", "vision_model.", num_vision_layers)
    take("visual.ln_post.weight", "vision_model.post_layernorm.weight")
    take("visual.ln_post.bias", "vision_model.post_layernorm.bias")
    take("visual.proj", "visual_projection.weight", lambda t: t.t().contiguous())
    # text tower
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    blocks("", "text_model.", num_text_layers)
    take("ln_final.weight", "text_model.final_layer_norm.weight")
    take("ln_final.bias", "text_model.final_layer_norm.bias")
    take("text_projection", "text_projection.weight", lambda t: t.t().contiguous())
    take("logit_scale", "logit_scale", lambda t: t.reshape(()))
    return mapped, consumed


def clip_model_from_open_clip(state_dict: dict, model_cfg: dict | None = None, *, path: Path = Path("?")):
    """A transformers ``CLIPModel`` holding the weights of an open_clip ViT CLIP state dict."""
    from transformers import CLIPModel

    state_dict = strip_prefix(state_dict, "module.")
    config = clip_config_from_open_clip(state_dict, model_cfg, path=path)
    mapped, consumed = open_clip_to_transformers(
        state_dict, config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    )
    with torch.device("meta"):  # no random init of ~1B parameters: every tensor comes from the checkpoint
        model = CLIPModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    unused = set(state_dict) - consumed - _IGNORED_SOURCE_KEYS
    check_keys(expected, mapped, unused, what="open_clip ViT CLIP (HPS)", path=path)
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False, assign=True)
    materialise_position_ids(model)
    return model.eval()


def load_hps(version: str = "hpsv2.1", path: str | None = None) -> ClipSimilarityReward:
    """HPSv2 (``version="hpsv2"``) or HPSv2.1 (``"hpsv2.1"``).

    ``path``: the ``.pt`` checkpoint, or a directory with it (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``
    or a single weights file), optionally with ``open_clip_config.json`` and CLIP tokenizer files; the tokenizer
    comes from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` otherwise. Default: ``xswu/HPSv2`` on the hub.
    """
    filename = HPS_FILES[version]
    directory: Path | None = None
    if path is None:
        ckpt = hub_file(HPS_REPO, filename, reward=version)
    else:
        p = existing_path(path, version)
        directory = p if p.is_dir() else p.parent
        ckpt = find_weight_file(p, reward=version, preferred=[filename], repo_id=HPS_REPO)
    state_dict = extract_state_dict(load_checkpoint(ckpt), ckpt)
    model = clip_model_from_open_clip(state_dict, read_open_clip_config(directory), path=ckpt)
    return _hps_reward(model, load_clip_tokenizer(directory, VIT_H_PROCESSOR_REPO, reward=version), version)


def hps_reward_from_state_dict(state_dict: dict, tokenizer, version: str = "hpsv2.1", model_cfg: dict | None = None,
                               *, path: Path = Path("?")) -> ClipSimilarityReward:
    """The HPS reward for an open_clip state dict in memory (see :func:`clip_model_from_open_clip`)."""
    return _hps_reward(clip_model_from_open_clip(state_dict, model_cfg, path=path), tokenizer, version)


def _hps_reward(model, tokenizer, version: str) -> ClipSimilarityReward:
    return ClipSimilarityReward(
        model,
        tokenizer,
        name=version,
        units=f"{'HPSv2.1' if version == 'hpsv2.1' else 'HPSv2'}: 100 * cosine, about 25..32 on SD images",
        scale=100.0,
        text_pooling="argmax",
        preprocess=ImagePreprocess(size=int(model.config.vision_config.image_size), mode="pad"),
    )
