"""ImageReward: BLIP ViT-L image encoder + BERT with cross-attention + a linear MLP head, on transformers modules.

The released ``ImageReward.pt`` (THUDM/ImageReward) is a flat state dict:

- ``blip.visual_encoder.*``: BLIP's timm-style ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; LayerNorm eps 1e-6, GELU) ->
  transformers ``BlipVisionModel``.
- ``blip.text_encoder.*``: BLIP's ``med.py`` BERT (``embeddings.{word,position}_embeddings``, ``LayerNorm``,
  ``encoder.layer.N.{attention,crossattention,intermediate,output}``, no pooler) -> transformers ``BlipTextModel``
  (the port of med.py), whose names are the same.
- ``mlp.layers.{0,2,4,6,7}``: Linear 768-1024-128-64-16-1 without activations (1, 3, 5 are dropouts).
- ``blip.vision_proj`` / ``blip.text_proj`` (BLIP's ITC heads) are not used by the score.

Text config comes from ``med_config.json`` (BERT-base, vocab 30524 = bert-base-uncased + [DEC] + [ENC]).
Score: ``(mlp(cross-attended [CLS] feature) - 0.16717362830052426) / 1.0333394966054072`` (normalised: about 0
on average over the ImageReward training set, roughly -2..2). Prompts are truncated to 35 tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .base import RewardModel
from .errors import RewardCheckpointError
from .heads import LINEAR_INDICES, LinearMLPHead, head_from_state_dict
from .preprocess import ImagePreprocess
from .weights import (
    check_keys,
    count_indexed,
    existing_path,
    extract_state_dict,
    find_weight_file,
    has_tokenizer,
    hub_file,
    hub_snapshot,
    load_checkpoint,
    materialise_position_ids,
    require_keys,
    strip_prefix,
)

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_REPO = "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35

_IGNORED_SOURCE_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

_VIT_BLOCK_RENAMES = (
    ("norm1", "layer_norm1"),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


class ImageRewardModel(RewardModel):
    """ImageReward v1.0 as a differentiable reward; score is the normalised ImageReward (about -2..2)."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: LinearMLPHead, tokenizer,
                 preprocess: ImagePreprocess | None = None, max_length: int = TEXT_MAX_LENGTH) -> None:
        super().__init__()
        self.name = "imagereward"
        self.units = "ImageReward: (mlp - 0.167) / 1.033, about -2..2"
        self.vision = vision
        self.text = text
        self.mlp = mlp.float()
        self.tokenizer = tokenizer
        vocab = text.config.vocab_size
        if len(tokenizer) > vocab:
            raise RewardCheckpointError(f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary "
                                        f"is {vocab}; ImageReward needs bert-base-uncased + [DEC] + [ENC]")
        self.max_length = max_length
        self.preprocess = preprocess or ImagePreprocess(
            size=int(vision.config.image_size), mode="crop", crop_rounding="round"
        )
        self._freeze()

    def _checkpoint_layers(self) -> list[nn.Module]:
        return list(self.vision.encoder.layers) + list(self.text.encoder.layer)

    def _backbone_dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    def _float32_modules(self) -> list[nn.Module]:
        return [self.mlp]

    def text_tokens(self, prompts: list[str]) -> dict:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cross-attended [CLS] text features ``[B, hidden]`` for validated images and prompts."""
        return self.pixel_features(self.preprocess(images), prompts)

    def pixel_features(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[CLS] features for already preprocessed pixels ``[B, 3, S, S]``."""
        pixels = pixels.to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.text_tokens(prompts)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        return out.last_hidden_state[:, 0, :]

    def score_preprocessed(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The score formula on already preprocessed pixels ``[B, 3, S, S]`` (no input validation)."""
        raw = self.mlp(self.pixel_features(pixels, prompts).float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def blip_configs(state_dict: dict, med_config: dict, *, path: Path):
    """transformers ``BlipVisionConfig`` / ``BlipTextConfig`` for an ImageReward state dict and its med_config."""
    from transformers import BlipTextConfig, BlipVisionConfig

    need = ["blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.blocks.0.mlp.fc1.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
            "mlp.layers.0.weight"]
    require_keys(state_dict, need, path=path, what="an ImageReward state dict")
    conv = state_dict["blip.visual_encoder.patch_embed.proj.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state_dict["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    if width % 64:
        raise RewardCheckpointError(f"checkpoint {str(path)!r}: ViT width {width} is not a multiple of 64 "
                                    "(BLIP ViTs use 64-wide heads: base 768/12, large 1024/16)")
    vision = BlipVisionConfig(
        hidden_size=int(width),
        intermediate_size=int(state_dict["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=count_indexed(state_dict, r"blip\.visual_encoder\.blocks\.(\d+)\."),
        num_attention_heads=int(width // 64),
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    try:
        text = BlipTextConfig(
            vocab_size=int(med_config["vocab_size"]),
            hidden_size=int(med_config["hidden_size"]),
            encoder_hidden_size=int(width),
            intermediate_size=int(med_config["intermediate_size"]),
            num_hidden_layers=int(med_config["num_hidden_layers"]),
            num_attention_heads=int(med_config["num_attention_heads"]),
            max_position_embeddings=int(med_config["max_position_embeddings"]),
            hidden_act=med_config.get("hidden_act", "gelu"),
            layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(med_config.get("pad_token_id", 0)),
            bos_token_id=None,  # generation ids are unused by the encoder; BLIP's defaults assume the full vocab
            eos_token_id=None,
            sep_token_id=None,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
        )
    except KeyError as exc:
        raise RewardCheckpointError(f"med_config.json lacks {exc}; expected a BERT config as in THUDM/ImageReward")
    return vision, text


def imagereward_to_transformers(state_dict: dict, num_vision_layers: int):
    """Rename ImageReward.pt keys to ``{"vision": ..., "text": ..., "mlp": ...}`` state dicts; returns consumed."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    mlp: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()

    def take(dst: dict, src: str, name: str) -> None:
        if src in state_dict:
            dst[name] = state_dict[src]
            consumed.add(src)

    v = "blip.visual_encoder."
    take(vision, v + "cls_token", "embeddings.class_embedding")
    take(vision, v + "pos_embed", "embeddings.position_embedding")
    for kind in ("weight", "bias"):
        take(vision, v + f"patch_embed.proj.{kind}", f"embeddings.patch_embedding.{kind}")
        take(vision, v + f"norm.{kind}", f"post_layernorm.{kind}")
        for i in range(num_vision_layers):
            for a, b in _VIT_BLOCK_RENAMES:
                take(vision, v + f"blocks.{i}.{a}.{kind}", f"encoder.layers.{i}.{b}.{kind}")
    t = "blip.text_encoder."
    for key in state_dict:
        if key.startswith(t) and not _IGNORED_SOURCE_KEYS.match(key):
            take(text, key, key[len(t):])
    for index in LINEAR_INDICES:
        for kind in ("weight", "bias"):
            take(mlp, f"mlp.layers.{index}.{kind}", f"{index}.{kind}")
    return {"vision": vision, "text": text, "mlp": mlp}, consumed


def imagereward_from_state_dict(state_dict: dict, med_config: dict, tokenizer, *,
                                path: Path = Path("?")) -> ImageRewardModel:
    """Build :class:`ImageRewardModel` from an ImageReward.pt state dict, its med_config and a BERT tokenizer."""
    return ImageRewardModel(*imagereward_modules(state_dict, med_config, path=path), tokenizer)


def imagereward_modules(state_dict: dict, med_config: dict, *, path: Path = Path("?")):
    """``(BlipVisionModel, BlipTextModel, LinearMLPHead)`` holding the weights of an ImageReward.pt state dict."""
    from transformers import BlipTextModel, BlipVisionModel

    state_dict = strip_prefix(state_dict, "module.")
    vision_cfg, text_cfg = blip_configs(state_dict, med_config, path=path)
    parts, consumed = imagereward_to_transformers(state_dict, vision_cfg.num_hidden_layers)
    mlp = head_from_state_dict(parts.pop("mlp"), what="ImageReward MLP head (mlp.layers.{0,2,4,6,7})", path=path)
    with torch.device("meta"):
        modules = {"vision": BlipVisionModel(vision_cfg), "text": BlipTextModel(text_cfg, add_pooling_layer=False)}
    expected, mapped = {}, {}
    for part, module in modules.items():
        expected.update({f"{part}.{k}": v.shape for k, v in module.state_dict().items()
                         if not k.endswith("position_ids")})
        mapped.update({f"{part}.{k}": v for k, v in parts[part].items()})
    unused = {k for k in set(state_dict) - consumed if not _IGNORED_SOURCE_KEYS.match(k)}
    check_keys(expected, mapped, unused, what="ImageReward (BLIP ViT + BERT + MLP)", path=path)
    for part, module in modules.items():
        module.load_state_dict({k: v.float() for k, v in parts[part].items()}, strict=False, assign=True)
        materialise_position_ids(module)
    return modules["vision"], modules["text"], mlp


def load_blip_tokenizer(directory: Path | None, *, reward: str = "imagereward"):
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``, as BLIP's ``init_tokenizer``."""
    from transformers import BertTokenizer

    if directory is None or not has_tokenizer(directory):
        directory = hub_snapshot(BERT_REPO, ["vocab.txt", "tokenizer_config.json", "tokenizer.json"],
                                 reward=reward, what="Tokenizer files")
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(path: str | None = None) -> ImageRewardModel:
    """ImageReward v1.0. ``path``: a directory with ``ImageReward.pt`` and ``med_config.json`` (optionally BERT
    tokenizer files, else bert-base-uncased from the hub), or the ``.pt`` file with ``med_config.json`` beside it.
    Default: ``THUDM/ImageReward`` on the hub."""
    directory: Path | None = None
    if path is None:
        ckpt = hub_file(IMAGEREWARD_REPO, IMAGEREWARD_FILE, reward="imagereward")
        med_path = hub_file(IMAGEREWARD_REPO, MED_CONFIG_FILE, reward="imagereward")
    else:
        p = existing_path(path, "imagereward")
        directory = p if p.is_dir() else p.parent
        ckpt = find_weight_file(p, reward="imagereward", preferred=[IMAGEREWARD_FILE], repo_id=IMAGEREWARD_REPO)
        med_path = directory / MED_CONFIG_FILE
        if not med_path.is_file():
            med_path = hub_file(IMAGEREWARD_REPO, MED_CONFIG_FILE, reward="imagereward")
    med_config = json.loads(Path(med_path).read_text())
    state_dict = extract_state_dict(load_checkpoint(ckpt), ckpt)
    modules = imagereward_modules(state_dict, med_config, path=ckpt)  # checkpoint problems surface before downloads
    return ImageRewardModel(*modules, load_blip_tokenizer(directory))
