"""The shipped training workflow: up to date with its generator, UI format the frontend reads (version 0.4, links
consistent, widget values in the order the node declares its widgets), API twin naming registered nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from comfy_rdt_nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).resolve().parent.parent
UI = REPO / "workflows" / "train_reward_lora.json"
API = REPO / "workflows" / "api" / "train_reward_lora.json"
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "REWARD_MODEL", "LATENT", "CONDITIONING", "RDT_SCHEDULE"}


def _frontend_widget_order(node_cls) -> list[str]:
    """Widget inputs in declaration order (required, then optional), with the seed's control widget after it."""
    decl = node_cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, spec in decl.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, str) and kind in SOCKET_TYPES:
                continue
            names.append(name)
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                names.append("control_after_generate")
    return names


def test_generator_is_up_to_date():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_train_workflow.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ui_format():
    ui = json.loads(UI.read_text())
    assert ui["version"] == 0.4 and ui["groups"] == [] and ui["config"] == {} and isinstance(ui["extra"], dict)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    for lid, src, slot, dst, dst_slot, typ in ui["links"]:
        assert lid in nodes[src]["outputs"][slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ == nodes[src]["outputs"][slot]["type"]
    for node in nodes.values():
        cls = NODE_CLASS_MAPPINGS.get(node["type"])
        if node["type"] in ("RDTTrainRewardLoRA", "RDTRewardModelLoader", "RDTRewardScorer"):
            # widget values in the frontend's order (the sampling nodes' declarations need ComfyUI's sampler list)
            assert len(node["widgets_values"]) == len(_frontend_widget_order(cls)), node["type"]
    train = next(n for n in nodes.values() if n["type"] == "RDTTrainRewardLoRA")
    values = dict(zip(_frontend_widget_order(NODE_CLASS_MAPPINGS["RDTTrainRewardLoRA"]), train["widgets_values"]))
    assert values["objective"] in NODE_CLASS_MAPPINGS["RDTTrainRewardLoRA"].INPUT_TYPES()["required"]["objective"][0]
    assert values["resolution"] % 8 == 0 and values["k"] <= values["sampling_steps"]


def test_api_twin_matches_and_uses_registered_nodes():
    api = json.loads(API.read_text())
    ui = json.loads(UI.read_text())
    core = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode", "ImageBatch", "SaveImage",
            "PreviewImage"}
    for nid, node in api.items():
        assert node["class_type"] in NODE_CLASS_MAPPINGS or node["class_type"] in core
    assert {str(n["id"]) for n in ui["nodes"] if n["type"] != "Note"} == set(api)
    train = next(n for n in api.values() if n["class_type"] == "RDTTrainRewardLoRA")
    decl = NODE_CLASS_MAPPINGS["RDTTrainRewardLoRA"].INPUT_TYPES()
    assert set(decl["required"]) <= set(train["inputs"])
    schedules = sorted(n["inputs"]["schedule"] for n in api.values() if n["class_type"] == "RDTDualModelKSampler")
    assert schedules == ["base", "power:2", "tuned"]
    assert any(n["class_type"] == "RDTRewardScorer" for n in api.values())
