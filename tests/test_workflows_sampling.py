"""The shipped sampling workflows: up to date with their generator, valid UI format, API twins that match."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_rdt_nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).resolve().parent.parent
NAMES = ["combined_generation", "aig_schedules_grid", "two_checkpoints"]
CORE = {"CheckpointLoaderSimple", "LoraLoaderModelOnly", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode",
        "ImageBatch", "SaveImage", "PreviewImage"}


def test_workflow_files_are_generated_and_up_to_date():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_workflows.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _no_null_containers(obj, path="$"):
    """Frontend schema: arrays / objects are never null (only scalar fields such as an input's link may be)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if v is None:
                assert k == "link", f"null at {path}.{k}"
            _no_null_containers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert v is not None, f"null at {path}[{i}]"
            _no_null_containers(v, f"{path}[{i}]")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_structure_and_api_twin(name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    assert ui["version"] == 0.4 and ui["groups"] == [] and ui["config"] == {} and isinstance(ui["extra"], dict)
    _no_null_containers(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and "models/" in notes[0]["widgets_values"][0]
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        assert lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["link"] == lid
        assert nodes[dst]["inputs"][dslot]["type"] == typ == nodes[src]["outputs"][sslot]["type"]
        # the API twin has the same link
        assert api[str(dst)]["inputs"][nodes[dst]["inputs"][dslot]["name"]] == [str(src), sslot]
    for nid, node in api.items():
        assert node["class_type"] in CORE or node["class_type"] in NODE_CLASS_MAPPINGS
        assert nodes[int(nid)]["type"] == node["class_type"]
    assert {n["type"] for n in ui["nodes"]} - {"Note"} == {n["class_type"] for n in api.values()}
    assert any(n["class_type"] == "RDTDualModelKSampler" for n in api.values())
