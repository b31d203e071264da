"""CLIP-based rewards on transformers' ``CLIPModel``: PickScore, CLIP score, LAION aesthetic (and HPS, see hps.py).

Scores (float32 ``[B]``):

- PickScore: ``logit_scale.exp() * cos(image, text)``; the released model has ``exp(logit_scale) = 100``, scores
  about 18..23 on SD images.
- CLIP score: ``max(100 * cos(image, text), 0)``, CLIP ViT-L/14; about 20..35 on matching image/prompt pairs.
- LAION aesthetic v2: linear MLP on the L2-normalised CLIP ViT-L/14 image embedding; about 1..10 (higher is better).
- HPSv2 / v2.1 (built in hps.py): ``100 * cos(image, text)``; v2.1 gives about 25..32 on SD images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .base import RewardModel, cosine
from .errors import RewardCheckpointError, RewardWeightsNotFoundError
from .heads import LinearMLPHead, head_from_state_dict
from .preprocess import ImagePreprocess
from .weights import (
    existing_path,
    extract_state_dict,
    has_hf_model,
    has_tokenizer,
    hub_file,
    hub_hf_model_dir,
    hub_snapshot,
    load_checkpoint,
)

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
VIT_H_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L_REPO = "openai/clip-vit-large-patch14"
AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_ORIGIN = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
TOKENIZER_PATTERNS = ["tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"]


def load_clip_tokenizer(directory: Path | None, fallback_repo: str, *, reward: str):
    """CLIP BPE tokenizer from ``directory`` when it has tokenizer files, else from ``fallback_repo``."""
    from transformers import CLIPTokenizer

    if directory is None or not has_tokenizer(directory):
        directory = hub_snapshot(fallback_repo, TOKENIZER_PATTERNS, reward=reward, what="Tokenizer files")
    return CLIPTokenizer.from_pretrained(str(directory))


def load_hf_clip(directory: Path, *, reward: str):
    """``CLIPModel`` from a transformers directory; missing or mis-shaped weights raise RewardCheckpointError."""
    from transformers import CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(str(directory), output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise RewardCheckpointError(
            f"cannot load a CLIP model for reward {reward!r} from {str(directory)!r}: {str(exc)[:500]}"
        ) from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise RewardCheckpointError(
            f"checkpoint in {str(directory)!r} does not match the CLIP architecture of its config.json: "
            f"missing {missing[:4]}, mismatched {list(mismatched)[:3]}"
        )
    return model


class ClipSimilarityReward(RewardModel):
    """``scale * cos(image embedding, text embedding)`` on a transformers ``CLIPModel``, optionally clipped below.

    Args:
        model: the CLIP model (frozen here).
        tokenizer: its CLIP tokenizer; prompts are truncated to ``max_length`` tokens (77).
        scale: a number, or ``"logit_scale"`` for the model's ``logit_scale.exp()`` (PickScore).
        clip_min: lower bound of the score (0 for CLIP score) or None.
        text_pooling: ``"model"`` uses transformers' pooled output; ``"argmax"`` takes the token with the highest
            id (the end-of-text token), as open_clip does (used for HPS checkpoints).
        preprocess: image preprocessing to the model's input size.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        units: str,
        scale: float | Literal["logit_scale"],
        clip_min: float | None = None,
        text_pooling: Literal["model", "argmax"] = "model",
        preprocess: ImagePreprocess | None = None,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        self.name = name
        self.units = units
        self.model = model
        self.tokenizer = tokenizer
        # Resolved once, in float32: exp(logit_scale) read from a bf16 copy would be off by about 1%.
        self.scale = float(model.logit_scale.detach().float().exp()) if scale == "logit_scale" else float(scale)
        self.clip_min = clip_min
        self.text_pooling = text_pooling
        self.preprocess = preprocess or ImagePreprocess(size=int(model.config.vision_config.image_size))
        self.max_length = max_length
        self._freeze()

    def _checkpoint_layers(self) -> list[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings of validated images ``[B, 3, H, W]`` in [0, 1]."""
        return self.pixel_features(self.preprocess(images))

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings of already preprocessed (resized, normalised) pixels."""
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return self.model.visual_projection(pooled)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings; no gradient (prompts are not optimised)."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        text_model = self.model.text_model
        if self.text_pooling == "argmax":
            hidden = text_model(input_ids=tokens["input_ids"]).last_hidden_state
            index = tokens["input_ids"].argmax(dim=-1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        else:
            pooled = text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled)

    def score_preprocessed(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The score formula on already preprocessed pixels ``[B, 3, S, S]`` (no input validation)."""
        cos = cosine(self.pixel_features(pixels), self.text_features(prompts))
        score = self.scale * cos
        if self.clip_min is not None:
            score = score.clamp_min(self.clip_min)
        return score


def aesthetic_head_from_state_dict(state_dict: dict, path: Path) -> LinearMLPHead:
    """The aesthetic head from its released state dict (keys ``layers.{0,2,4,6,7}.weight/bias``)."""
    sd = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state_dict.items()}
    return head_from_state_dict(sd, what="LAION aesthetic head (layers.{0,2,4,6,7})", path=path)


class AestheticReward(RewardModel):
    """LAION aesthetic predictor v2: ``mlp(normalize(clip_image_embedding))``, roughly 1..10 (higher is better).

    Prompts are ignored (``prompts=None`` is accepted).
    """

    needs_prompts = False

    def __init__(self, clip_model: nn.Module, head: LinearMLPHead, preprocess: ImagePreprocess | None = None) -> None:
        super().__init__()
        self.name = "aesthetic"
        self.units = "LAION aesthetic score, about 1..10"
        # Only the image tower is needed.
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection
        self.head = head.float()
        # The predictor's reference pipeline is OpenAI CLIP's torchvision transform (CenterCrop rounds the offset).
        self.preprocess = preprocess or ImagePreprocess(
            size=int(clip_model.config.vision_config.image_size), crop_rounding="round"
        )
        if head[0].in_features != self.visual_projection.out_features:
            raise RewardCheckpointError(
                f"aesthetic head expects {head[0].in_features}-d embeddings but the CLIP model gives "
                f"{self.visual_projection.out_features}-d (the released head needs CLIP ViT-L/14, 768-d)"
            )
        self._freeze()

    def _checkpoint_layers(self) -> list[nn.Module]:
        return list(self.vision_model.encoder.layers)

    def _backbone_dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    def _float32_modules(self) -> list[nn.Module]:
        return [self.head]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) CLIP image embeddings of validated images in [0, 1]."""
        return self.pixel_features(self.preprocess(images))

    def pixel_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)

    def score_preprocessed(self, pixels: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """The score formula on already preprocessed pixels ``[B, 3, S, S]`` (no input validation)."""
        emb = self.pixel_features(pixels).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(emb).squeeze(-1)


# ---- loaders ---------------------------------------------------------------------------------------------------
def _clip_dir(path: str | None, default_repo: str, reward: str) -> Path:
    if path is None:
        return hub_hf_model_dir(default_repo, reward=reward)
    p = existing_path(path, reward)
    if not p.is_dir() or not has_hf_model(p):
        raise RewardCheckpointError(
            f"path {str(p)!r} for reward {reward!r} must be a transformers CLIP directory (config.json plus "
            f"model.safetensors or pytorch_model.bin), e.g. a download of {default_repo!r}"
        )
    return p


def pickscore_reward(model: nn.Module, tokenizer) -> ClipSimilarityReward:
    """PickScore on an in-memory CLIP model and tokenizer: ``logit_scale.exp() * cos``."""
    return ClipSimilarityReward(
        model, tokenizer, name="pickscore", units="PickScore: logit_scale.exp() * cosine, about 18..23 on SD images",
        scale="logit_scale",
    )


def clipscore_reward(model: nn.Module, tokenizer) -> ClipSimilarityReward:
    """CLIP score on an in-memory CLIP model and tokenizer: ``max(100 * cos, 0)``."""
    return ClipSimilarityReward(
        model, tokenizer, name="clipscore", units="CLIP score: max(100 * cosine, 0), about 20..35 for matching pairs",
        scale=100.0, clip_min=0.0,
    )


def load_pickscore(path: str | None = None) -> ClipSimilarityReward:
    """PickScore v1 (CLIP ViT-H/14). ``path``: a transformers directory; tokenizer from it or from the laion repo."""
    directory = _clip_dir(path, PICKSCORE_REPO, "pickscore")
    return pickscore_reward(load_hf_clip(directory, reward="pickscore"),
                            load_clip_tokenizer(directory, VIT_H_PROCESSOR_REPO, reward="pickscore"))


def load_clipscore(path: str | None = None) -> ClipSimilarityReward:
    """CLIP score with CLIP ViT-L/14: ``max(100 * cos, 0)``."""
    directory = _clip_dir(path, CLIP_L_REPO, "clipscore")
    return clipscore_reward(load_hf_clip(directory, reward="clipscore"),
                            load_clip_tokenizer(directory, CLIP_L_REPO, reward="clipscore"))


def load_aesthetic(path: str | None = None) -> AestheticReward:
    """LAION aesthetic v2. ``path``: the head file, or a directory holding it and optionally the CLIP ViT-L/14
    model (config.json + weights, in the directory itself or in ``clip/``); CLIP comes from the hub otherwise."""
    clip_dir: Path | None = None
    if path is None:
        head_file = hub_file(AESTHETIC_REPO, AESTHETIC_FILE, reward="aesthetic")
    else:
        p = existing_path(path, "aesthetic")
        if p.is_dir():
            for cand in (p, p / "clip"):
                if cand.is_dir() and has_hf_model(cand):
                    clip_dir = cand
            pickles = [f for f in p.iterdir() if f.is_file() and f.suffix in (".pth", ".pt")]
            if (p / AESTHETIC_FILE).is_file():
                head_file = p / AESTHETIC_FILE
            elif len(pickles) == 1:
                head_file = pickles[0]
            else:
                raise RewardWeightsNotFoundError(
                    f"directory {str(p)!r} for reward 'aesthetic' should contain the head {AESTHETIC_FILE!r} "
                    f"(Hugging Face repo {AESTHETIC_REPO!r}, originally {AESTHETIC_ORIGIN}); found "
                    f"{[f.name for f in pickles] or 'no .pth/.pt file'}"
                )
        else:
            head_file = p
    head = aesthetic_head_from_state_dict(extract_state_dict(load_checkpoint(head_file), head_file), head_file)
    if clip_dir is None:
        clip_dir = hub_hf_model_dir(CLIP_L_REPO, reward="aesthetic")
    clip = load_hf_clip(clip_dir, reward="aesthetic")
    return AestheticReward(clip, head)
