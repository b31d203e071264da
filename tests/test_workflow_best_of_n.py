"""The shipped best-of-N workflow: a UI-format file the ComfyUI frontend accepts (version 0.4, consistent links, no
nulls where arrays/objects are expected) and its API twin with the same nodes, values and links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_rdt_nodes import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "workflows" / "best_of_n.json"
API_FILE = ROOT / "workflows" / "api" / "best_of_n.json"

# Widget inputs of the core nodes used, in ComfyUI's order (checked against a real server's /object_info in
# test_comfyui_reward_nodes.py). KSampler's seed widget is followed by the frontend's control_after_generate value.
CORE_WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "PreviewImage": [],
}
SOCKET_TYPES = {"IMAGE", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "REWARD_MODEL"}


def widget_names(class_type: str) -> list[str | None]:
    """Widget inputs of one of our nodes in INPUT_TYPES order (sockets and forceInput values are not widgets)."""
    if class_type in CORE_WIDGETS:
        return CORE_WIDGETS[class_type]
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 else {})
            if isinstance(kind, list) or (kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput")):
                names.append(name)
    return names


@pytest.fixture(scope="module")
def ui():
    return json.loads(UI_FILE.read_text())


@pytest.fixture(scope="module")
def api():
    return json.loads(API_FILE.read_text())


def _nulls(obj, path="$"):
    if obj is None:
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nulls(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nulls(v, f"{path}[{i}]")


def test_ui_top_level_shape(ui):
    assert ui["version"] == 0.4
    assert ui["groups"] == [] and ui["config"] == {} and isinstance(ui["extra"], dict)
    assert isinstance(ui["nodes"], list) and isinstance(ui["links"], list)
    assert ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    # the only nulls allowed: unconnected inputs' "link"
    bad = [p for p in _nulls(ui) if not (p.endswith(".link") and ".inputs[" in p)]
    assert bad == []


def test_ui_nodes_and_links_are_consistent(ui):
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"])
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, (n["id"], key)
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and isinstance(n["flags"], dict)
        assert isinstance(n.get("inputs", []), list) and isinstance(n.get("outputs", []), list)
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(nodes)))
    seen = set()
    for link in ui["links"]:
        assert len(link) == 6
        lid, src, src_slot, dst, dst_slot, typ = link
        assert lid not in seen
        seen.add(lid)
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == typ == inp["type"], link
        assert lid in out["links"] and inp["link"] == lid, link
        assert nodes[src]["order"] < nodes[dst]["order"]  # execution order follows the links
    for n in ui["nodes"]:
        for inp in n.get("inputs", []):
            assert inp["link"] is None or inp["link"] in seen
        for out in n.get("outputs", []):
            assert all(lid in seen for lid in out["links"])


def test_ui_widget_values_fit_the_nodes(ui):
    for n in ui["nodes"]:
        if n["type"] == "Note":
            continue
        names = widget_names(n["type"])
        assert len(n.get("widgets_values", [])) == len(names), n["type"]
        if n["type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
            merged = {**spec["required"], **spec.get("optional", {})}
            for name, value in zip(names, n["widgets_values"]):
                kind = merged[name][0]
                if isinstance(kind, list) and name != "weights":  # weights lists the local folder's files
                    assert value in kind, (n["type"], name, value)
        # socket inputs of our nodes are the non-widget inputs in INPUT_TYPES order
        if n["type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
            sockets = [k for s in ("required", "optional") for k, v in spec.get(s, {}).items()
                       if k not in names]
            assert [i["name"] for i in n["inputs"]] == sockets


def test_note_names_the_files_and_folders(ui):
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    for words in ("models/", "rewards/HPS_v2.1_compressed.pt", "rewards/ImageReward/ImageReward.pt",
                  "med_config.json", "checkpoints/", "xswu/HPSv2", "THUDM/ImageReward"):
        assert words in note, words


def test_api_twin_matches_the_ui(ui, api):
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert set(api) == set(ui_nodes)
    links = {link[0]: link for link in ui["links"]}
    for nid, node in api.items():
        un = ui_nodes[nid]
        assert node["class_type"] == un["type"]
        names = widget_names(un["type"])
        for name, value in zip(names, un.get("widgets_values", [])):
            if name is not None:
                assert node["inputs"][name] == value, (nid, name)
        for inp in un.get("inputs", []):
            if inp["link"] is None:
                assert inp["name"] not in node["inputs"]
                continue
            _, src, src_slot, _, _, _ = links[inp["link"]]
            assert node["inputs"][inp["name"]] == [str(src), src_slot], (nid, inp["name"])
        expected = {n for n in names if n is not None} | {i["name"] for i in un.get("inputs", []) if i["link"]}
        assert set(node["inputs"]) == expected, nid


def test_best_of_n_scores_two_rewards_and_saves_the_top_k(api):
    scorer = next(n for n in api.values() if n["class_type"] == "RDTRewardScorer")
    loaders = [n for n in api.values() if n["class_type"] == "RDTRewardModelLoader"]
    assert len(loaders) == 2 and "reward_model_2" in scorer["inputs"]
    assert scorer["inputs"]["top_k"] < next(n for n in api.values()
                                            if n["class_type"] == "EmptyLatentImage")["inputs"]["batch_size"]
    saver = next(n for n in api.values() if n["class_type"] == "RDTSaveScoredImages")
    scorer_id = next(k for k, n in api.items() if n["class_type"] == "RDTRewardScorer")
    assert saver["inputs"]["images"] == [scorer_id, 2] and saver["inputs"]["indices"] == [scorer_id, 3]
