"""Tiny random-weight reward models in their released formats, plus independent reference computations.

``make_tiny_reward(name, tmpdir) -> Path`` writes, for every reward name, a directory that
``rdt_lib.rewards.load_reward(name, path=...)`` loads without any download:

- pickscore / clipscore: a transformers CLIP directory (config.json, model.safetensors) + CLIP BPE tokenizer files
  (vocab.json, merges.txt) written by hand.
- aesthetic: the same CLIP directory + ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}``).
- hpsv2 / hpsv2.1: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` = ``{"state_dict": <open_clip names>}``
  + ``open_clip_config.json`` (head counts of the tiny model) + tokenizer files.
- imagereward: ``ImageReward.pt`` (flat state dict with ``blip.visual_encoder.*`` timm-ViT names,
  ``blip.text_encoder.*`` med.py BERT names incl. ``embeddings.position_ids``, ``blip.vision_proj``,
  ``blip.text_proj``, ``mlp.layers.{0,2,4,6,7}``) + ``med_config.json`` + a BERT ``vocab.txt``.

The open_clip and ImageReward state dicts are generated here from the released key names and shapes, not with
the library's mapping code. The reference forwards (``open_clip_reference_*``, ``imagereward_reference_score``)
recompute the released models from those tensors with plain torch ops, and the ``pil_*`` functions are the PIL
preprocessing of the reference implementations.

Also used by bench/bench_rewards.py and, later, by the trainer's tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
REWARD_NAMES = ("pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore")

# Tiny sizes (the real ones in comments). Image size stays 224 so the real preprocessing path is exercised.
TINY_CLIP = dict(hidden=32, layers=2, heads=2, patch=32, image=224, proj=32)  # ViT-H/14: 1280, 32, 16, 14, 224, 1024
TINY_OPEN_CLIP = dict(embed_dim=32, v_width=64, v_layers=2, head_width=32, patch=32, image=224,
                      t_width=64, t_layers=2, t_heads=2, ctx=77)
TINY_BLIP = dict(v_width=128, v_layers=2, patch=32, image=224, t_hidden=32, t_layers=2, t_heads=2,
                 t_inter=64, max_pos=40, embed_dim=16)  # BLIP ViT-L: 1024, 24, 16, 224; BERT-base 768, 12, 12
TINY_MLP = [32, 64, 32, 16, 8, 1]  # released: [768, 1024, 128, 64, 16, 1]
PROMPTS = ["a photo of a cat", "an apple on a wooden table", "a red car in the rain", "portrait of an old man"]


# ---- tokenizers ------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> list[str]:
    """The GPT-2 / CLIP byte symbols in byte order (the table lives in ``sd_fixtures``)."""
    from sd_fixtures import _bytes_to_unicode as byte_table

    return list(byte_table().values())


_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>"),
                ("a", "n</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("r", "e"), ("re", "d</w>")]


def write_clip_tokenizer(directory: Path) -> int:
    """Write a CLIP byte-level BPE tokenizer (vocab.json + merges.txt); returns its vocabulary size.

    Layout as the real one: 256 byte symbols, the same with ``</w>``, merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` last (the end-of-text token has the highest id, as open_clip's argmax pooling needs).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in _CLIP_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _CLIP_MERGES) + "\n"
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    return len(vocab)


def write_bert_vocab(directory: Path) -> int:
    """Write a WordPiece ``vocab.txt`` (any lowercase word tokenizes via ``##`` letters); returns its size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list(letters) + [f"##{c}" for c in letters] + ["a", "the", "of", "cat", "photo", "an", "apple", "red",
                                                             "car", "in", "on", ".", ","]
    words = list(dict.fromkeys(words))
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return len(words)


# ---- synthetic natural-looking images ---------------------------------------------------------------------------
def natural_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ``[3, H, W]`` image in [0, 1]: smooth colour gradients, overlapping discs and rectangles, low-frequency
    shading and mild sensor noise (photo-like statistics, no downloads)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    phase = torch.rand(3, generator=g) * 6.28
    img = torch.stack([0.5 + 0.35 * torch.sin(2.5 * xx + phase[0]),
                       0.45 + 0.3 * torch.cos(3.0 * yy + phase[1]),
                       0.4 + 0.3 * torch.sin(2.0 * (xx + yy) + phase[2])])
    for _ in range(10):
        cy, cx, r, kind = torch.rand(4, generator=g).tolist()
        col = torch.rand(3, 1, 1, generator=g)
        if kind < 0.5:
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.04 + 0.15 * r) ** 2).float()
        else:
            m = ((yy - cy).abs() < 0.05 + 0.1 * r).float() * ((xx - cx).abs() < 0.05 + 0.15 * r).float()
        m = F.avg_pool2d(m[None, None], 5, 1, 2)[0, 0]  # slightly soft edges
        img = img * (1 - m) + col * m
    shade = F.interpolate(torch.randn(1, 3, max(height // 32, 2), max(width // 32, 2), generator=g),
                          size=(height, width), mode="bicubic", align_corners=False)[0]
    img = img + 0.06 * shade + 0.015 * torch.randn(3, height, width, generator=g)
    return img.clamp(0, 1)


def natural_batch(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([natural_image(height, width, seed + i) for i in range(n)])


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """The uint8 rounding a PIL reference applies to its input, so both paths see the same pixels."""
    return (images * 255.0).round() / 255.0


# ---- PIL reference preprocessing ------------------------------------------------------------------------------
def clip_image_processor(size: int = 224):
    """transformers' CLIP image processor on its PIL backend (shortest side bicubic, center crop, normalise)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the default processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pil_clip_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    return clip_image_processor(size)(images=to_pil(images), return_tensors="pt")["pixel_values"]


def pil_hps_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's official preprocessing in PIL: longest side to ``size`` (bicubic, sides rounded), zero-pad to a
    square (left/top get the smaller half), ToTensor, Normalize."""
    from PIL import Image

    out = []
    for im in to_pil(images):
        w, h = im.size
        scale = size / float(max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        im = im.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
        arr = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255.0
        out.append((arr - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None])
    return torch.stack(out)


# ---- random tensors in released layouts -----------------------------------------------------------------------
def _r(g: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _ln(sd: dict, key: str, width: int, g: torch.Generator, bias: torch.Tensor | None = None) -> None:
    sd[key + ".weight"] = 1.0 + _r(g, width, std=0.1)
    sd[key + ".bias"] = _r(g, width, std=0.05) if bias is None else bias


def open_clip_state_dict(cfg: dict = TINY_OPEN_CLIP, vocab_size: int = 49408, seed: int = 0) -> dict:
    """Random open_clip ViT CLIP state dict in open_clip's key names (as in HPS_v2*_compressed.pt's state_dict).

    The final LayerNorm biases share one direction and both projections are equal, so image/text cosines are
    clearly positive (as for a trained model on matching pairs) instead of random around 0.
    """
    g = torch.Generator().manual_seed(seed)
    vw, tw, e, p = cfg["v_width"], cfg["t_width"], cfg["embed_dim"], cfg["patch"]
    grid = cfg["image"] // p
    sd: dict[str, torch.Tensor] = {}

    def blocks(prefix: str, width: int, n: int) -> None:
        for i in range(n):
            b = f"{prefix}transformer.resblocks.{i}."
            _ln(sd, b + "ln_1", width, g)
            sd[b + "attn.in_proj_weight"] = _r(g, 3 * width, width, std=width ** -0.5)
            sd[b + "attn.in_proj_bias"] = _r(g, 3 * width, std=0.02)
            sd[b + "attn.out_proj.weight"] = _r(g, width, width, std=width ** -0.5)
            sd[b + "attn.out_proj.bias"] = _r(g, width)
            _ln(sd, b + "ln_2", width, g)
            sd[b + "mlp.c_fc.weight"] = _r(g, 4 * width, width, std=width ** -0.5)
            sd[b + "mlp.c_fc.bias"] = _r(g, 4 * width)
            sd[b + "mlp.c_proj.weight"] = _r(g, width, 4 * width, std=(4 * width) ** -0.5)
            sd[b + "mlp.c_proj.bias"] = _r(g, width)

    shared = torch.randn(vw, generator=g) * 1.2
    proj = _r(g, vw, e, std=vw ** -0.5)
    sd["visual.class_embedding"] = _r(g, vw, std=vw ** -0.5)
    sd["visual.positional_embedding"] = _r(g, grid * grid + 1, vw, std=vw ** -0.5)
    sd["visual.conv1.weight"] = _r(g, vw, 3, p, p, std=(3 * p * p) ** -0.5 * 4)
    _ln(sd, "visual.ln_pre", vw, g)
    blocks("visual.", vw, cfg["v_layers"])
    _ln(sd, "visual.ln_post", vw, g, bias=shared.clone())
    sd["visual.proj"] = proj.clone()
    sd["token_embedding.weight"] = _r(g, vocab_size, tw, std=0.3)
    sd["positional_embedding"] = _r(g, cfg["ctx"], tw, std=0.1)
    blocks("", tw, cfg["t_layers"])
    _ln(sd, "ln_final", tw, g, bias=shared[:tw].clone())
    sd["text_projection"] = proj[:tw].clone()
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


def open_clip_config(cfg: dict = TINY_OPEN_CLIP, vocab_size: int = 49408) -> dict:
    """``open_clip_config.json`` content (hub layout) for :func:`open_clip_state_dict`."""
    return {"model_cfg": {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": {"image_size": cfg["image"], "layers": cfg["v_layers"], "width": cfg["v_width"],
                       "head_width": cfg["head_width"], "patch_size": cfg["patch"]},
        "text_cfg": {"context_length": cfg["ctx"], "vocab_size": vocab_size, "width": cfg["t_width"],
                     "heads": cfg["t_heads"], "layers": cfg["t_layers"]},
    }, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}


def imagereward_state_dict(cfg: dict = TINY_BLIP, vocab_size: int = 30524, mlp_widths=None, seed: int = 0) -> dict:
    """Random ImageReward.pt state dict with the released key names (BLIP timm-ViT + med.py BERT + MLP)."""
    g = torch.Generator().manual_seed(seed)
    vw, p, th, ti = cfg["v_width"], cfg["patch"], cfg["t_hidden"], cfg["t_inter"]
    mlp_widths = mlp_widths or [th] + TINY_MLP[1:]
    grid = cfg["image"] // p
    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = _r(g, 1, 1, vw, std=0.02)
    sd[v + "pos_embed"] = _r(g, 1, grid * grid + 1, vw, std=0.02)
    sd[v + "patch_embed.proj.weight"] = _r(g, vw, 3, p, p, std=(3 * p * p) ** -0.5 * 4)
    sd[v + "patch_embed.proj.bias"] = _r(g, vw)
    for i in range(cfg["v_layers"]):
        b = f"{v}blocks.{i}."
        _ln(sd, b + "norm1", vw, g)
        sd[b + "attn.qkv.weight"] = _r(g, 3 * vw, vw, std=vw ** -0.5)
        sd[b + "attn.qkv.bias"] = _r(g, 3 * vw)
        sd[b + "attn.proj.weight"] = _r(g, vw, vw, std=vw ** -0.5)
        sd[b + "attn.proj.bias"] = _r(g, vw)
        _ln(sd, b + "norm2", vw, g)
        sd[b + "mlp.fc1.weight"] = _r(g, 4 * vw, vw, std=vw ** -0.5)
        sd[b + "mlp.fc1.bias"] = _r(g, 4 * vw)
        sd[b + "mlp.fc2.weight"] = _r(g, vw, 4 * vw, std=(4 * vw) ** -0.5)
        sd[b + "mlp.fc2.bias"] = _r(g, vw)
    _ln(sd, v + "norm", vw, g)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = _r(g, vocab_size, th, std=0.3)
    sd[t + "embeddings.position_embeddings.weight"] = _r(g, cfg["max_pos"], th, std=0.1)
    sd[t + "embeddings.position_ids"] = torch.arange(cfg["max_pos"]).expand(1, -1).clone()
    _ln(sd, t + "embeddings.LayerNorm", th, g)
    for i in range(cfg["t_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", th), ("crossattention", vw)):
            sd[b + f"{att}.self.query.weight"] = _r(g, th, th, std=th ** -0.5)
            sd[b + f"{att}.self.query.bias"] = _r(g, th)
            sd[b + f"{att}.self.key.weight"] = _r(g, th, kv, std=kv ** -0.5)
            sd[b + f"{att}.self.key.bias"] = _r(g, th)
            sd[b + f"{att}.self.value.weight"] = _r(g, th, kv, std=kv ** -0.5)
            sd[b + f"{att}.self.value.bias"] = _r(g, th)
            sd[b + f"{att}.output.dense.weight"] = _r(g, th, th, std=th ** -0.5)
            sd[b + f"{att}.output.dense.bias"] = _r(g, th)
            _ln(sd, b + f"{att}.output.LayerNorm", th, g)
        sd[b + "intermediate.dense.weight"] = _r(g, ti, th, std=th ** -0.5)
        sd[b + "intermediate.dense.bias"] = _r(g, ti)
        sd[b + "output.dense.weight"] = _r(g, th, ti, std=ti ** -0.5)
        sd[b + "output.dense.bias"] = _r(g, th)
        _ln(sd, b + "output.LayerNorm", th, g)
    sd["blip.vision_proj.weight"] = _r(g, cfg["embed_dim"], vw)
    sd["blip.vision_proj.bias"] = _r(g, cfg["embed_dim"])
    sd["blip.text_proj.weight"] = _r(g, cfg["embed_dim"], th)
    sd["blip.text_proj.bias"] = _r(g, cfg["embed_dim"])
    _mlp_into(sd, "mlp.layers.", mlp_widths, g, final_bias=1.5)
    return sd


def _mlp_into(sd: dict, prefix: str, widths: list[int], g: torch.Generator, final_bias: float) -> None:
    for j, idx in enumerate((0, 2, 4, 6, 7)):
        sd[f"{prefix}{idx}.weight"] = _r(g, widths[j + 1], widths[j], std=widths[j] ** -0.5)
        sd[f"{prefix}{idx}.bias"] = _r(g, widths[j + 1], std=0.1)
    sd[f"{prefix}7.bias"] = torch.full((1,), final_bias)


def med_config(cfg: dict = TINY_BLIP, vocab_size: int = 30524) -> dict:
    """``med_config.json`` in ImageReward's format (BERT config with cross-attention)."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": cfg["t_hidden"], "initializer_range": 0.02,
            "intermediate_size": cfg["t_inter"], "layer_norm_eps": 1e-12, "max_position_embeddings": cfg["max_pos"],
            "model_type": "bert", "num_attention_heads": cfg["t_heads"], "num_hidden_layers": cfg["t_layers"],
            "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": cfg["v_width"],
            "add_cross_attention": True}


def tiny_clip_model(vocab_size: int, cfg: dict = TINY_CLIP, seed: int = 0):
    """A random transformers ``CLIPModel`` with positive image/text cosines (see open_clip_state_dict)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    h = cfg["hidden"]
    common = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg["layers"],
                  num_attention_heads=cfg["heads"], projection_dim=cfg["proj"])
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **common),
        vision_config=dict(image_size=cfg["image"], patch_size=cfg["patch"], **common),
        projection_dim=cfg["proj"], logit_scale_init_value=math.log(100.0),
    )
    model = CLIPModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        shared = torch.randn(h, generator=g) * 0.8
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.embeddings.patch_embedding.weight.mul_(20.0)  # make the image matter
    return model


# ---- make_tiny_reward --------------------------------------------------------------------------------------------
def _write_hf_clip(directory: Path, seed: int) -> None:
    vocab = write_clip_tokenizer(directory)
    tiny_clip_model(vocab, seed=seed).save_pretrained(str(directory), safe_serialization=True)


def make_tiny_reward(name: str, tmpdir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model of reward ``name`` in its released format under ``tmpdir``; returns the
    path to pass as ``load_reward(name, path=...)``."""
    directory = Path(tmpdir) / f"tiny-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    seed = seed + 10 * REWARD_NAMES.index(name) if name in REWARD_NAMES else seed  # distinct weights per reward
    if name in ("pickscore", "clipscore"):
        _write_hf_clip(directory, seed)
    elif name == "aesthetic":
        _write_hf_clip(directory, seed)
        g = torch.Generator().manual_seed(seed + 7)
        head: dict[str, torch.Tensor] = {}
        _mlp_into(head, "layers.", [TINY_CLIP["proj"]] + TINY_MLP[1:], g, final_bias=5.0)
        torch.save(head, directory / AESTHETIC_FILE)
    elif name in HPS_FILES:
        vocab = write_clip_tokenizer(directory)
        sd = open_clip_state_dict(vocab_size=vocab, seed=seed)
        torch.save({"state_dict": sd}, directory / HPS_FILES[name])
        (directory / "open_clip_config.json").write_text(json.dumps(open_clip_config(vocab_size=vocab)))
    elif name == "imagereward":
        vocab = write_bert_vocab(directory) + 2  # + [DEC], [ENC] as BLIP's init_tokenizer adds
        torch.save(imagereward_state_dict(vocab_size=vocab, seed=seed), directory / "ImageReward.pt")
        (directory / "med_config.json").write_text(json.dumps(med_config(vocab_size=vocab)))
    else:
        raise ValueError(f"no tiny fixture for reward {name!r}; known: {REWARD_NAMES}")
    return directory


# ---- reference forwards from released tensors (plain torch) ------------------------------------------------------
def _layer_norm(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _open_clip_block(x: torch.Tensor, sd: dict, prefix: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x)) with nn.MultiheadAttention math."""
    h = _layer_norm(x, sd, prefix + "ln_1", 1e-5).transpose(0, 1)  # NLD -> LND as nn.MultiheadAttention
    width = x.shape[-1]
    attn, _ = F.multi_head_attention_forward(
        h, h, h, width, heads, sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"], None, None,
        False, 0.0, sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"], training=False,
        need_weights=False, attn_mask=mask)
    x = x + attn.transpose(0, 1)
    h = _layer_norm(x, sd, prefix + "ln_2", 1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])),
                 sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])
    return x + h


def open_clip_reference_image(sd: dict, model_cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer.forward from the named tensors: projected image features (unnormalised)."""
    v = model_cfg["vision_cfg"]
    heads = v["width"] // v["head_width"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre", 1e-5)
    for i in range(v["layers"]):
        x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, None)
    x = _layer_norm(x, sd, "visual.ln_post", 1e-5)[:, 0]
    return x @ sd["visual.proj"]


def open_clip_reference_text(sd: dict, model_cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip TextTransformer.forward (causal mask, argmax pooling) from the named tensors."""
    t = model_cfg["text_cfg"]
    n = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(t["layers"]):
        x = _open_clip_block(x, sd, f"transformer.resblocks.{i}.", t["heads"], mask)
    x = _layer_norm(x, sd, "ln_final", 1e-5)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return pooled @ sd["text_projection"]


def open_clip_tokens(tokenizer, prompts: list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's tokenize(): [sot] + bpe + [eot], zero-padded to the context length, eot kept on truncation."""
    out = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tokenizer.eos_token_id
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _bert_attention(x, kv, sd, prefix, heads, additive_mask):
    b, n, d = x.shape
    q = F.linear(x, sd[prefix + "query.weight"], sd[prefix + "query.bias"]).view(b, n, heads, -1).transpose(1, 2)
    k = F.linear(kv, sd[prefix + "key.weight"], sd[prefix + "key.bias"]).view(b, kv.shape[1], heads, -1).transpose(1, 2)
    v = F.linear(kv, sd[prefix + "value.weight"], sd[prefix + "value.bias"]).view(b, kv.shape[1], heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def imagereward_reference_score(sd: dict, med: dict, pixels: torch.Tensor, input_ids: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageReward.score from the named tensors: BLIP ViT (timm), med.py BERT with cross-attention ('multimodal'
    mode), [CLS] feature, MLP, normalisation. Returns ``(score, cls_feature)``."""
    v = "blip.visual_encoder."
    width = sd[v + "cls_token"].shape[-1]
    heads = width // 64
    patch = sd[v + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[v + "pos_embed"][:, : x.shape[1]]
    n_blocks = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(v + "blocks."))
    for i in range(n_blocks):
        b = f"{v}blocks.{i}."
        h = _layer_norm(x, sd, b + "norm1", 1e-6)
        bsz, n, d = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(bsz, n, 3, heads, d // heads)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ vv).transpose(1, 2).reshape(bsz, n, d), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = _layer_norm(x, sd, b + "norm2", 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    image_embeds = _layer_norm(x, sd, v + "norm", 1e-6)

    t = "blip.text_encoder."
    eps = med["layer_norm_eps"]
    n = input_ids.shape[1]
    y = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:n]
    y = _layer_norm(y, sd, t + "embeddings.LayerNorm", eps)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv, mask in (("attention", None, self_mask), ("crossattention", image_embeds, None)):
            a = _bert_attention(y, y if kv is None else kv, sd, b + f"{att}.self.", med["num_attention_heads"], mask)
            a = F.linear(a, sd[b + f"{att}.output.dense.weight"], sd[b + f"{att}.output.dense.bias"])
            y = _layer_norm(a + y, sd, b + f"{att}.output.LayerNorm", eps)
        h = F.gelu(F.linear(y, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        y = _layer_norm(F.linear(h, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"]) + y, sd,
                        b + "output.LayerNorm", eps)
    cls = y[:, 0]
    r = cls
    for idx in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072, cls


def aesthetic_reference_head(head: dict, embeds: torch.Tensor) -> torch.Tensor:
    """improved-aesthetic-predictor: MLP on the L2-normalised CLIP image embedding."""
    x = embeds / embeds.norm(dim=-1, keepdim=True)
    for idx in (0, 2, 4, 6, 7):
        x = F.linear(x, head[f"layers.{idx}.weight"], head[f"layers.{idx}.bias"])
    return x.squeeze(-1)
