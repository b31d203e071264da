"""Throughput and drift of the reward models: our tensor path against the PIL-processor reference path.

For each reward the real architecture (PickScore/HPS: CLIP ViT-H/14, aesthetic/CLIP score: CLIP ViT-L/14,
ImageReward: BLIP ViT-L/16 + BERT-base + MLP) is built with random weights (no downloads), then:

- ours: ``reward.score(images, prompts)`` on a float tensor ``[B, 3, H, W]`` (torch/kornia preprocessing);
- reference: the same images as PIL images, preprocessed the way the released implementation does (transformers'
  CLIP image processor on PIL; HPS: PIL resize-longest + zero pad), then the same model forward and score formula
  (``reward.score_preprocessed``). The tensor -> PIL conversion is done before timing.

Reported: images/second of each path (model forward included, no gradient; one timed pass each, plus a warm-up
pass on GPU), the preprocessing time alone, and the drift between the paths: relative score drift
``|ours - ref| / |ref|`` (max over the batch), absolute score drift, and the distance of the L2-normalised image
features (first two images). With random weights the absolute scores mean nothing (cosines near 0 make the
relative score drift large); the feature drift measures preprocessing fidelity.

    python bench/bench_rewards.py                                  # all rewards, batch 16 at 512x512
    python bench/bench_rewards.py --rewards hpsv2.1,imagereward --batch 4 --height 768 --width 512
    python bench/bench_rewards.py --tiny                           # tiny models: a quick smoke run
    python bench/bench_rewards.py --device cuda --dtype bf16       # GPU
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import reward_fixtures as fx  # noqa: E402  (tiny tokenizers, synthetic images, PIL reference preprocessing)
from rdt_lib.rewards import (  # noqa: E402
    AestheticReward,
    LinearMLPHead,
    clipscore_reward,
    hps_reward_from_state_dict,
    imagereward_from_state_dict,
    pickscore_reward,
)
from rdt_lib.rewards.imagereward import load_blip_tokenizer  # noqa: E402

VIT_H14 = dict(v_hidden=1280, v_layers=32, v_heads=16, patch=14, t_hidden=1024, t_layers=24, t_heads=16, proj=1024)
VIT_L14 = dict(v_hidden=1024, v_layers=24, v_heads=16, patch=14, t_hidden=768, t_layers=12, t_heads=12, proj=768)
OPEN_CLIP_H14 = dict(embed_dim=1024, v_width=1280, v_layers=32, head_width=80, patch=14, image=224, t_width=1024,
                     t_layers=24, t_heads=16, ctx=77)
BLIP_L = dict(v_width=1024, v_layers=24, patch=16, image=224, t_hidden=768, t_layers=12, t_heads=12, t_inter=3072,
              max_pos=512, embed_dim=256)
TINY_H = dict(v_hidden=64, v_layers=2, v_heads=2, patch=14, t_hidden=64, t_layers=2, t_heads=2, proj=32)
TINY_BLIP = dict(fx.TINY_BLIP, patch=16)


def clip_model(arch: dict, vocab_size: int):
    """Random-weight transformers CLIPModel of the given architecture (GELU as ViT-H-14 / quick_gelu as OpenAI)."""
    from transformers import CLIPConfig, CLIPModel

    act = "quick_gelu" if arch is VIT_L14 else "gelu"
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=arch["t_hidden"], intermediate_size=4 * arch["t_hidden"],
                         num_hidden_layers=arch["t_layers"], num_attention_heads=arch["t_heads"],
                         max_position_embeddings=77, hidden_act=act, projection_dim=arch["proj"],
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=arch["v_hidden"], intermediate_size=4 * arch["v_hidden"],
                           num_hidden_layers=arch["v_layers"], num_attention_heads=arch["v_heads"], image_size=224,
                           patch_size=arch["patch"], hidden_act=act, projection_dim=arch["proj"]),
        projection_dim=arch["proj"], logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def build(name: str, tiny: bool, tmp: Path):
    """(reward, reference preprocessing kind) with random weights of the real (or tiny) architecture."""
    clip_tok_dir = tmp / "clip-tok"
    fx.write_clip_tokenizer(clip_tok_dir)
    from transformers import CLIPTokenizer

    clip_tok = CLIPTokenizer.from_pretrained(str(clip_tok_dir))
    if name == "pickscore":
        return pickscore_reward(clip_model(TINY_H if tiny else VIT_H14, 49408), clip_tok), "crop"
    if name == "clipscore":
        return clipscore_reward(clip_model(TINY_H if tiny else VIT_L14, 49408), clip_tok), "crop"
    if name == "aesthetic":
        model = clip_model(TINY_H if tiny else VIT_L14, 49408)
        width = model.config.projection_dim
        head = LinearMLPHead([width, 1024, 128, 64, 16, 1])
        return AestheticReward(model, head), "crop"
    if name in ("hpsv2", "hpsv2.1"):
        cfg = dict(fx.TINY_OPEN_CLIP, patch=14) if tiny else OPEN_CLIP_H14
        sd = fx.open_clip_state_dict(cfg, vocab_size=49408)
        model_cfg = fx.open_clip_config(cfg, vocab_size=49408)["model_cfg"]
        return hps_reward_from_state_dict(sd, clip_tok, name, model_cfg), "pad"
    if name == "imagereward":
        bert_dir = tmp / "bert-tok"
        fx.write_bert_vocab(bert_dir)
        cfg = TINY_BLIP if tiny else BLIP_L
        widths = [cfg["t_hidden"], 1024, 128, 64, 16, 1]
        sd = fx.imagereward_state_dict(cfg, vocab_size=30524, mlp_widths=widths)
        return imagereward_from_state_dict(sd, fx.med_config(cfg, vocab_size=30524), load_blip_tokenizer(bert_dir)), \
            "crop"
    raise SystemExit(f"unknown reward {name!r}")


def features(reward, images=None, pixels=None, prompts=None):
    if reward.name == "imagereward":
        return reward.features(images, prompts) if pixels is None else reward.pixel_features(pixels, prompts)
    return reward.image_features(images) if pixels is None else reward.pixel_features(pixels)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name: str, args, tmp: Path) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    reward, kind = build(name, args.tiny, tmp)
    reward.place(device, dtype)
    build_s = time.perf_counter() - t0
    images = fx.quantize(fx.natural_batch(args.batch, args.height, args.width, seed=1))
    prompts = [fx.PROMPTS[i % len(fx.PROMPTS)] for i in range(args.batch)]
    pil = fx.to_pil(images)
    processor = fx.clip_image_processor(reward.preprocess.size)
    images_dev = images.to(device)

    def ours():
        return reward.score(images_dev, prompts)

    def reference():
        if kind == "pad":
            pixels = fx.pil_hps_pixels(images, reward.preprocess.size)  # PIL resize + pad (from the same pixels)
        else:
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
        return reward.score_preprocessed(pixels.to(device), prompts)

    with torch.no_grad():
        if device.type == "cuda":  # warm-up (kernels, allocator); on CPU a full extra pass only costs time
            ours(), reference()
        timings = {}
        for label, fn in (("ours", ours), ("reference", reference)):
            sync(device)
            t = time.perf_counter()
            for _ in range(args.repeats):
                out = fn()
            sync(device)
            timings[label] = (time.perf_counter() - t) / args.repeats
            timings[label + "_scores"] = out.float().cpu()
        # Preprocessing alone.
        t = time.perf_counter()
        reward.preprocess(images_dev)
        sync(device)
        pre_ours = time.perf_counter() - t
        t = time.perf_counter()
        if kind == "pad":
            fx.pil_hps_pixels(images, reward.preprocess.size)
        else:
            processor(images=pil, return_tensors="pt")
        pre_ref = time.perf_counter() - t
        # Feature drift on the first two images (two more small forwards per path).
        few = images[:2]
        ref_pixels = fx.pil_hps_pixels(few) if kind == "pad" else processor(images=pil[:2], return_tensors="pt")[
            "pixel_values"]
        f_ours = features(reward, images=few.to(device), prompts=prompts[:2]).float()
        f_ref = features(reward, pixels=ref_pixels.to(device), prompts=prompts[:2]).float()
    backward_s = None
    if args.backward:
        x = images_dev.clone().requires_grad_(True)
        sync(device)
        t = time.perf_counter()
        reward.score(x, prompts).sum().backward()
        sync(device)
        backward_s = time.perf_counter() - t
    a, b = timings["ours_scores"], timings["reference_scores"]
    score_drift = float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())
    feat_drift = float((torch.nn.functional.normalize(f_ours, dim=-1)
                        - torch.nn.functional.normalize(f_ref, dim=-1)).norm(dim=-1).max())
    result = dict(name=name, params_m=sum(p.numel() for p in reward.parameters()) / 1e6, build_s=build_s,
                  ours_ips=args.batch / timings["ours"], ref_ips=args.batch / timings["reference"],
                  pre_ours_ms=1000 * pre_ours, pre_ref_ms=1000 * pre_ref, score_drift=score_drift,
                  abs_drift=float((a - b).abs().max()), feat_drift=feat_drift, backward_s=backward_s,
                  mean_score=float(a.mean()))
    del reward
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards", default="pickscore,hpsv2.1,imagereward,aesthetic,clipscore")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--backward", action="store_true", help="also time score + backward to the pixels")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the real architectures")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    device_desc = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"# rewards benchmark: batch {args.batch} at {args.width}x{args.height} (WxH), {device_desc}, {args.dtype}, "
          f"{'tiny' if args.tiny else 'real-size'} random-weight models, torch {torch.__version__}")
    header = (f"{'reward':12s} {'params':>8s} {'ours img/s':>11s} {'ref img/s':>10s} {'pre ours':>9s} "
              f"{'pre ref':>9s} {'score drift':>12s} {'abs drift':>10s} {'feat drift':>11s}"
              + (f" {'fwd+bwd s':>10s}" if args.backward else ""))
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
            r = run(name, args, Path(tmp))
            line = (f"{r['name']:12s} {r['params_m']:7.0f}M {r['ours_ips']:11.2f} {r['ref_ips']:10.2f} "
                    f"{r['pre_ours_ms']:7.0f}ms {r['pre_ref_ms']:7.0f}ms {100 * r['score_drift']:11.3f}% "
                    f"{r['abs_drift']:10.4f} {100 * r['feat_drift']:10.3f}%")
            if args.backward:
                line += f" {r['backward_s']:10.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
