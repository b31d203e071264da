"""Write the shipped ComfyUI workflows: UI format ``workflows/<name>.json`` (drag-in, frontend format 0.4) and
its API-format twin ``workflows/api/<name>.json`` (what the tests queue), both from one description here.

    python scripts/make_workflows.py        # rewrites the files
    python scripts/make_workflows.py --check  # exit 1 if a file differs from what would be written

Each node type's sockets and widget order are listed in ``NODE_TYPES`` (as ComfyUI declares them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "workflows"

# type -> (inputs [(name, type)], outputs [(name, type)], widget names in order)
NODE_TYPES = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["ckpt_name"]),
    "LoraLoaderModelOnly": ([("model", "MODEL")], [("MODEL", "MODEL")], ["lora_name", "strength_model"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "RDTDualModelKSampler": (
        [("base_model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("tuned_model", "MODEL"), ("schedule_input", "RDT_SCHEDULE")],
        [("LATENT", "LATENT")],
        ["seed", "control_after_generate", "steps", "cfg_base", "cfg_tuned", "sampler_name", "scheduler", "denoise",
         "schedule"],
    ),
    "RDTSchedule": ([], [("schedule", "RDT_SCHEDULE"), ("plot", "IMAGE")], ["kind", "value", "text", "plot_steps"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")], []),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "Note": ([], [], ["text"]),
}
FRONTEND_ONLY = {"Note"}  # not part of the API graph
UI_ONLY_WIDGETS = {"control_after_generate"}

SD15 = "v1-5-pruned-emaonly.safetensors"
LORA = "rdt_reward_lora.safetensors"
FINETUNE = "sd15_reward_finetune.safetensors"
PROMPT = "a photo of a red fox sitting in fresh snow, morning light"
NEGATIVE = "blurry, low quality"


class Flow:
    def __init__(self, title: str) -> None:
        self.title = title
        self.nodes: list[dict] = []

    def add(self, type_: str, pos, widgets: dict | None = None, links: dict | None = None, title: str | None = None,
            size=(320, 120)) -> int:
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": type_, "pos": list(pos), "size": list(size), "widgets": widgets or {},
                           "links": links or {}, "title": title})
        return nid

    # -- API format ------------------------------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            if n["type"] in FRONTEND_ONLY:
                continue
            _, _, widget_names = NODE_TYPES[n["type"]]
            inputs = {k: n["widgets"][k] for k in widget_names if k not in UI_ONLY_WIDGETS}
            for name, (src, slot) in n["links"].items():
                inputs[name] = [str(src), slot]
            out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                                 "_meta": {"title": n["title"] or n["type"]}}
        return out

    # -- UI format -------------------------------------------------------------------------------------------------
    def ui(self) -> dict:
        links = []
        out_links: dict[tuple[int, int], list[int]] = {}
        in_link: dict[tuple[int, str], int] = {}
        for n in self.nodes:
            ins, _, _ = NODE_TYPES[n["type"]]
            names = [name for name, _ in ins]
            for name, (src, slot) in n["links"].items():
                src_type = NODE_TYPES[self.nodes[src - 1]["type"]][1][slot][1]
                lid = len(links) + 1
                links.append([lid, src, slot, n["id"], names.index(name), src_type])
                out_links.setdefault((src, slot), []).append(lid)
                in_link[(n["id"], name)] = lid
        nodes = []
        for order, n in enumerate(self.nodes):
            ins, outs, widget_names = NODE_TYPES[n["type"]]
            node = {
                "id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {}, "order": order,
                "mode": 0,
                "inputs": [{"name": name, "type": t, "link": in_link.get((n["id"], name))} for name, t in ins],
                "outputs": [{"name": name, "type": t, "links": out_links.get((n["id"], i), []), "slot_index": i}
                            for i, (name, t) in enumerate(outs)],
                "properties": {} if n["type"] in FRONTEND_ONLY else {"Node name for S&R": n["type"]},
                "widgets_values": [n["widgets"][k] for k in widget_names],
            }
            if n["title"]:
                node["title"] = n["title"]
            if n["type"] == "Note":
                node["color"], node["bgcolor"] = "#432", "#653"
            nodes.append(node)
        return {
            "id": str(uuid.UUID(hashlib.md5(self.title.encode()).hexdigest(), version=4)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        }


def _prompts(f: Flow, ckpt: int, x: int = 20) -> tuple[int, int, int]:
    pos = f.add("CLIPTextEncode", (x + 380, 60), {"text": PROMPT}, {"clip": (ckpt, 1)}, "Positive", (400, 140))
    neg = f.add("CLIPTextEncode", (x + 380, 240), {"text": NEGATIVE}, {"clip": (ckpt, 1)}, "Negative", (400, 140))
    lat = f.add("EmptyLatentImage", (x + 380, 420), {"width": 512, "height": 512, "batch_size": 1})
    return pos, neg, lat


def _dual_widgets(schedule: str, steps: int = 30) -> dict:
    return {"seed": 42, "control_after_generate": "fixed", "steps": steps, "cfg_base": 7.5, "cfg_tuned": 7.5,
            "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0, "schedule": schedule}


def combined_generation() -> Flow:
    f = Flow("combined generation")
    f.add("Note", (20, 300), {"text": (
        "Combined generation: the base model for the first 75% of the steps, the reward-tuned model (base + LoRA) "
        "for the rest, in one sampler run (switch@0.75).\n\nFiles it expects:\n"
        f"- models/checkpoints/{SD15}  (Stable Diffusion 1.5)\n"
        f"- models/loras/{LORA}  (a reward LoRA for SD1.5, e.g. from rdt-train; kohya format)\n\n"
        "Only one copy of the UNet is loaded: the LoRA is applied at forward time to the tuned model's rows.")},
        title="Read me", size=(340, 260))
    ck = f.add("CheckpointLoaderSimple", (20, 60), {"ckpt_name": SD15}, size=(320, 100))
    lora = f.add("LoraLoaderModelOnly", (20, 180), {"lora_name": LORA, "strength_model": 1.0}, {"model": (ck, 0)},
                 "Reward LoRA (tuned model)", (320, 90))
    pos, neg, lat = _prompts(f, ck)
    ks = f.add("RDTDualModelKSampler", (820, 60), _dual_widgets("switch@0.75"),
               {"base_model": (ck, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0),
                "tuned_model": (lora, 0)}, size=(340, 330))
    dec = f.add("VAEDecode", (1200, 60), {}, {"samples": (ks, 0), "vae": (ck, 2)}, size=(200, 50))
    f.add("SaveImage", (1200, 160), {"filename_prefix": "rdt_combined"}, {"images": (dec, 0)}, size=(400, 420))
    return f


AIG_SCHEDULES = ["base", "switch@0.75", "linear", "power:2", "power:4", "tuned"]


def aig_schedules_grid() -> Flow:
    f = Flow("aig schedules grid")
    f.add("Note", (20, 420), {"text": (
        "AIG and combined generation side by side: one seed, the same base + LoRA pair, one dual-model sampler "
        f"per schedule ({', '.join(AIG_SCHEDULES)}); the images are batched into one grid (left to right).\n\n"
        "Files it expects:\n"
        f"- models/checkpoints/{SD15}\n- models/loras/{LORA}  (a reward LoRA for SD1.5, kohya format)\n\n"
        "The Schedule node shows the power:2 weights over the 30 steps.")}, title="Read me", size=(340, 260))
    ck = f.add("CheckpointLoaderSimple", (20, 60), {"ckpt_name": SD15}, size=(320, 100))
    lora = f.add("LoraLoaderModelOnly", (20, 180), {"lora_name": LORA, "strength_model": 1.0}, {"model": (ck, 0)},
                 "Reward LoRA (tuned model)", (320, 90))
    pos, neg, lat = _prompts(f, ck)
    sched = f.add("RDTSchedule", (20, 720), {"kind": "power", "value": 2.0, "text": "", "plot_steps": 30},
                  size=(320, 150))
    f.add("PreviewImage", (20, 900), {}, {"images": (sched, 1)}, "power:2 over 30 steps", (320, 260))
    batch = None
    for i, spec in enumerate(AIG_SCHEDULES):
        x = 820 + 360 * i
        ks = f.add("RDTDualModelKSampler", (x, 60), _dual_widgets(spec),
                   {"base_model": (ck, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0),
                    "tuned_model": (lora, 0)}, title=f"schedule {spec}", size=(340, 330))
        dec = f.add("VAEDecode", (x, 420), {}, {"samples": (ks, 0), "vae": (ck, 2)}, size=(200, 50))
        if batch is None:
            batch = dec
        else:
            batch = f.add("ImageBatch", (x, 500), {}, {"image1": (batch, 0), "image2": (dec, 0)}, size=(200, 60))
    f.add("SaveImage", (820, 620), {"filename_prefix": "rdt_aig_grid"}, {"images": (batch, 0)}, size=(900, 420))
    return f


def two_checkpoints() -> Flow:
    f = Flow("two checkpoints")
    f.add("Note", (20, 420), {"text": (
        "A base checkpoint and a fully fine-tuned (reward-tuned) checkpoint of the same type, mixed by AIG "
        "(power:2: w = (i/N)^2).\n\nFiles it expects:\n"
        f"- models/checkpoints/{SD15}  (the base, SD1.5)\n"
        f"- models/checkpoints/{FINETUNE}  (the full fine-tune, SD1.5)\n\n"
        "Both are loaded through ComfyUI's model management, which offloads them as usual.")},
        title="Read me", size=(340, 240))
    ck = f.add("CheckpointLoaderSimple", (20, 60), {"ckpt_name": SD15}, title="Base checkpoint", size=(320, 100))
    tuned = f.add("CheckpointLoaderSimple", (20, 200), {"ckpt_name": FINETUNE}, title="Tuned checkpoint",
                  size=(320, 100))
    pos, neg, lat = _prompts(f, ck)
    ks = f.add("RDTDualModelKSampler", (820, 60), _dual_widgets("power:2"),
               {"base_model": (ck, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0),
                "tuned_model": (tuned, 0)}, size=(340, 330))
    dec = f.add("VAEDecode", (1200, 60), {}, {"samples": (ks, 0), "vae": (ck, 2)}, size=(200, 50))
    f.add("SaveImage", (1200, 160), {"filename_prefix": "rdt_two_checkpoints"}, {"images": (dec, 0)},
          size=(400, 420))
    return f


WORKFLOWS = {"combined_generation": combined_generation, "aig_schedules_grid": aig_schedules_grid,
             "two_checkpoints": two_checkpoints}


def render() -> dict[Path, str]:
    files = {}
    for name, build in WORKFLOWS.items():
        flow = build()
        files[OUT / f"{name}.json"] = json.dumps(flow.ui(), indent=1) + "\n"
        files[OUT / "api" / f"{name}.json"] = json.dumps(flow.api(), indent=1) + "\n"
    return files


def write_or_check(files: dict[Path, str], argv=None, description: str = "") -> int:
    """Write ``files`` (path -> text) atomically, or with ``--check`` only report those that differ (exit 1)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in files.items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    if stale:
        print("out of date: " + ", ".join(str(p.relative_to(REPO)) for p in stale), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return write_or_check(render(), argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
