"""Write the reward-LoRA training workflow: ``workflows/train_reward_lora.json`` (UI format 0.4) and its API twin
``workflows/api/train_reward_lora.json``, with the same :class:`make_workflows.Flow` builder as the sampling
workflows.

    python scripts/make_train_workflow.py          # rewrites the two files
    python scripts/make_train_workflow.py --check  # exit 1 if a file differs

The graph: a checkpoint and a reward model -> RDT Train Reward LoRA -> the same prompt and seed sampled with the base
model, the tuned model and AIG (power:2) by three RDT Dual-Model KSamplers -> decoded, batched (base, tuned, AIG)
and scored by the RDT Reward Scorer; the trainer's reward/loss plot is previewed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_workflows as mw  # noqa: E402

TRAIN_WIDGETS = ["reward_weight", "prompts", "objective", "steps", "learning_rate", "lora_rank", "lora_alpha", "k",
                 "sampling_steps", "batch_size", "grad_accumulation", "kl_coeff", "l2_init_coeff", "random_eta", "seed",
                 "control_after_generate", "resolution", "lora_name", "if_exists", "cfg", "checkpoint_every",
                 "gradient_checkpointing", "captions", "reward_weight_2", "reward_weight_3"]
NODE_TYPES = {
    **mw.NODE_TYPES,
    "RDTRewardModelLoader": ([], [("reward_model", "REWARD_MODEL")], ["reward", "weights", "precision"]),
    "RDTTrainRewardLoRA": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("reward_model", "REWARD_MODEL"), ("images", "IMAGE"),
         ("reward_model_2", "REWARD_MODEL"), ("reward_model_3", "REWARD_MODEL")],
        [("model", "MODEL"), ("lora_name", "STRING"), ("reward_loss_plot", "IMAGE")],
        TRAIN_WIDGETS),
    "RDTRewardScorer": (
        [("images", "IMAGE"), ("reward_model", "REWARD_MODEL"), ("reward_model_2", "REWARD_MODEL"),
         ("reward_model_3", "REWARD_MODEL")],
        [("scores", "FLOAT"), ("sorted_images", "IMAGE"), ("top_k_images", "IMAGE"), ("top_k_indices", "INT"),
         ("table", "STRING")],
        ["prompt", "weight", "top_k", "normalization", "weight_2", "weight_3"]),
}
PROMPTS = ("a photo of a red fox sitting in fresh snow, morning light\n"
           "a watercolor painting of a lighthouse on a cliff\n"
           "a bowl of ramen on a wooden table, studio photo\n"
           "portrait of an old fisherman, dramatic lighting")
LORA_NAME = "rdt_reward_lora"


def train_reward_lora() -> mw.Flow:
    mw.NODE_TYPES.update(NODE_TYPES)
    f = mw.Flow("train reward lora")
    f.add("Note", (20, 640), {"text": (
        "Train a reward LoRA on a checkpoint (DRaFT-1 against HPSv2.1 here), then sample one prompt and seed with "
        "the base model, the tuned model and AIG (power:2: w = (i/N)^2) side by side, and score the three images.\n\n"
        f"Files it expects:\n- models/checkpoints/{mw.SD15}  (SD1.5; SDXL works too, set resolution 1024)\n"
        "- a reward in models/rewards (or 'default': fetched from the Hugging Face hub)\n\n"
        f"The LoRA is saved to models/loras/{LORA_NAME}.safetensors. Queue again with if_exists = resume to "
        "continue training from its checkpoint; interrupting saves what was trained. Lower batch_size, resolution "
        "or K, or turn gradient_checkpointing on, when memory runs out.")}, title="Read me", size=(360, 300))
    ck = f.add("CheckpointLoaderSimple", (20, 60), {"ckpt_name": mw.SD15}, size=(320, 100))
    rm = f.add("RDTRewardModelLoader", (20, 200), {"reward": "hpsv2.1", "weights": "default", "precision": "auto"},
               size=(320, 110))
    train = f.add("RDTTrainRewardLoRA", (380, 60), {
        "reward_weight": 1.0, "prompts": PROMPTS, "objective": "draft", "steps": 200, "learning_rate": 2.5e-4,
        "lora_rank": 8, "lora_alpha": 8.0, "k": 1, "sampling_steps": 25, "batch_size": 1, "grad_accumulation": 4,
        "kl_coeff": 0.0, "l2_init_coeff": 0.0, "random_eta": False, "seed": 0, "control_after_generate": "fixed",
        "resolution": 512, "lora_name": LORA_NAME, "if_exists": "resume", "cfg": 7.5, "checkpoint_every": 50,
        "gradient_checkpointing": True, "captions": "", "reward_weight_2": 1.0, "reward_weight_3": 1.0},
        {"model": (ck, 0), "clip": (ck, 1), "vae": (ck, 2), "reward_model": (rm, 0)}, size=(380, 760))
    f.add("PreviewImage", (380, 860), {}, {"images": (train, 2)}, "reward and loss per step", (380, 300))
    pos, neg, lat = mw._prompts(f, ck, x=420)
    f.nodes[pos - 1]["widgets"]["text"] = PROMPTS.splitlines()[0]
    batch = None
    for i, (spec, title) in enumerate([("base", "base"), ("tuned", "tuned"), ("power:2", "AIG power:2")]):
        x = 1240 + 360 * i
        ks = f.add("RDTDualModelKSampler", (x, 60), mw._dual_widgets(spec),
                   {"base_model": (ck, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0),
                    "tuned_model": (train, 0)}, title=title, size=(340, 330))
        dec = f.add("VAEDecode", (x, 420), {}, {"samples": (ks, 0), "vae": (ck, 2)}, size=(200, 50))
        batch = dec if batch is None else f.add("ImageBatch", (x, 500), {}, {"image1": (batch, 0),
                                                                            "image2": (dec, 0)}, size=(200, 60))
    scorer = f.add("RDTRewardScorer", (1240, 600), {"prompt": PROMPTS.splitlines()[0], "weight": 1.0, "top_k": 1,
                                                    "normalization": "none", "weight_2": 1.0, "weight_3": 1.0},
                   {"images": (batch, 0), "reward_model": (rm, 0)}, "score base / tuned / AIG", (340, 220))
    f.add("SaveImage", (1600, 600), {"filename_prefix": "rdt_base_tuned_aig"}, {"images": (batch, 0)},
          "base | tuned | AIG", (700, 320))
    f.add("PreviewImage", (1240, 860), {}, {"images": (scorer, 1)}, "sorted best first", (340, 260))
    return f


def render() -> dict[Path, str]:
    flow = train_reward_lora()
    return {mw.OUT / "train_reward_lora.json": json.dumps(flow.ui(), indent=1) + "\n",
            mw.OUT / "api" / "train_reward_lora.json": json.dumps(flow.api(), indent=1) + "\n"}


def main(argv=None) -> int:
    return mw.write_or_check(render(), argv, __doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main())
