"""The reward nodes in a real ComfyUI (marker ``comfyui``; fixtures from tests/comfyui_server.py): the loader lists
models/rewards, the best-of-N workflow runs end to end with tiny rewards, the scorer's table reaches the history, a
wrong weights file is a node error and the server keeps serving."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path

import pytest

import reward_fixtures as fx
from test_workflow_best_of_n import API_FILE, CORE_WIDGETS, UI_FILE

pytestmark = pytest.mark.comfyui

TINY_REWARDS = ("hpsv2.1", "imagereward")


@pytest.fixture(scope="session")
def reward_models(comfy_models):
    """Tiny rewards written into the session's models/rewards (the loader lists the folder on every request, so
    this works whether or not the server is already up)."""
    rewards = Path(comfy_models) / "rewards"
    rewards.mkdir(parents=True, exist_ok=True)
    for name in TINY_REWARDS:
        fx.make_tiny_reward(name, rewards)
    return rewards


def _graph(prefix: str) -> dict:
    graph = json.loads(API_FILE.read_text())
    by_type = {n["class_type"]: k for k, n in graph.items() if n["class_type"] not in ("RDTRewardModelLoader",)}
    graph[by_type["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = "rdt_tiny_sd15.safetensors"
    graph[by_type["EmptyLatentImage"]]["inputs"].update(width=64, height=64, batch_size=4)
    graph[by_type["KSampler"]]["inputs"]["steps"] = 2
    graph[by_type["RDTRewardScorer"]]["inputs"]["top_k"] = 2
    graph[by_type["RDTSaveScoredImages"]]["inputs"]["filename_prefix"] = prefix
    loaders = sorted(k for k, n in graph.items() if n["class_type"] == "RDTRewardModelLoader")
    for key in loaders:
        reward = graph[key]["inputs"]["reward"]
        assert reward in TINY_REWARDS
        graph[key]["inputs"].update(weights=f"tiny-{reward}/", precision="fp32")
    return graph


def test_object_info_describes_the_nodes_and_the_workflow_widgets(comfy_server, reward_models):
    info = comfy_server.object_info()
    for name in ("RDTRewardModelLoader", "RDTRewardScorer", "RDTSaveScoredImages"):
        assert info[name]["category"] == "rdt/reward"
    assert info["RDTRewardScorer"]["output_is_list"] == [True, False, False, True, False]
    weights = info["RDTRewardModelLoader"]["input"]["required"]["weights"][0]
    assert weights[0] == "default"
    assert {f"tiny-{n}/" for n in TINY_REWARDS} <= set(weights)
    assert "tiny-hpsv2.1/HPS_v2.1_compressed.pt" in weights and "tiny-imagereward/ImageReward.pt" in weights
    # the UI workflow's widget values follow each node's widget inputs in the server's order
    ui = json.loads(UI_FILE.read_text())
    for node in ui["nodes"]:
        if node["type"] in CORE_WIDGETS:
            spec = info[node["type"]]["input"]
            order = info[node["type"]].get("input_order", {})
            names = [n for s in ("required", "optional") for n in (order.get(s) or list(spec.get(s, {})))
                     if isinstance(spec[s][n][0], list) or spec[s][n][0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
            assert [n for n in CORE_WIDGETS[node["type"]] if n is not None] == names, node["type"]


def test_loader_lists_a_file_placed_later(comfy_server, reward_models):
    extra = reward_models / f"late-{uuid.uuid4().hex[:6]}"
    path = fx.make_tiny_reward("aesthetic", extra)
    weights = comfy_server.object_info()["RDTRewardModelLoader"]["input"]["required"]["weights"][0]
    assert f"{path.relative_to(reward_models).as_posix()}/" in weights


def test_best_of_n_workflow_end_to_end(comfy_server, reward_models):
    prefix = f"rdt_test/best_{uuid.uuid4().hex[:8]}"
    graph = _graph(prefix)
    entry = comfy_server.run(graph, timeout=600)
    outputs = entry["outputs"]
    scorer_id = next(k for k, n in graph.items() if n["class_type"] == "RDTRewardScorer")
    saver_id = next(k for k, n in graph.items() if n["class_type"] == "RDTSaveScoredImages")
    table = outputs[scorer_id]["text"][0]
    rows = [line.split() for line in table.splitlines()[1:5]]
    assert [r[0] for r in rows] == ["1*", "2*", "3", "4"]
    combined = {int(r[1]): float(r[-1]) for r in rows}
    assert sorted(combined, key=lambda i: -combined[i]) == [int(r[1]) for r in rows]
    saved = outputs[saver_id]["images"]
    assert len(saved) == 2
    for rank, item in enumerate(saved, 1):
        m = re.search(r"_rank(\d+)_img(\d+)_score(-?[\d.]+)_\.png$", item["filename"])
        assert m and int(m.group(1)) == rank
        index, score = int(m.group(2)), float(m.group(3))
        assert int(rows[rank - 1][1]) == index and score == pytest.approx(combined[index], abs=2e-4)
        file = Path(comfy_server.output_dir) / item["subfolder"] / item["filename"]
        from PIL import Image

        with Image.open(file) as im:
            meta = json.loads(im.text["rdt_score"])
            assert meta["rank"] == rank and meta["batch_index"] == index
            assert meta["score"] == pytest.approx(combined[index], abs=2e-4)
            assert im.size == (64, 64) and "prompt" in im.text
    # the rewards went through ComfyUI's model management (load_models_gpu logs each model it loads)
    assert "Requested to load _ManagedReward" in comfy_server.log_text()


def test_wrong_weights_is_a_node_error_and_the_server_keeps_serving(comfy_server, reward_models):
    from comfyui_server import ComfyNodeError

    graph = _graph(f"rdt_test/bad_{uuid.uuid4().hex[:8]}")
    bad = copy.deepcopy(graph)
    loader = next(k for k, n in bad.items() if n["class_type"] == "RDTRewardModelLoader"
                  and n["inputs"]["reward"] == "imagereward")
    bad[loader]["inputs"]["weights"] = "tiny-hpsv2.1/"
    with pytest.raises(ComfyNodeError) as err:
        comfy_server.run(bad, timeout=600)
    text = str(err.value)
    assert "HPS checkpoint" in text and "ImageReward.pt" in text
    # k larger than the batch: refused with the scorer's message
    big_k = copy.deepcopy(graph)
    scorer = next(k for k, n in big_k.items() if n["class_type"] == "RDTRewardScorer")
    big_k[scorer]["inputs"]["top_k"] = 9
    with pytest.raises(ComfyNodeError, match=r"top_k = 9 is larger than the batch \(4 images\)"):
        comfy_server.run(big_k, timeout=600)
    assert "RDTRewardScorer" in comfy_server.object_info()
    assert comfy_server.run(graph, timeout=600)["outputs"]


@pytest.mark.browser
def test_scorer_table_shows_on_the_node_in_the_frontend(comfy_server, comfy_models, reward_models, tmp_path):
    """The best-of-N UI workflow in ComfyUI's frontend (headless Chromium): after a run queued from the page the
    Reward Scorer node shows its table (web/js extension), and the display widget is not saved in the workflow."""
    import time

    import comfyui_browser as cb
    from test_comfyui_browser import prepare_for_test_run

    missing = cb.browser_missing()
    if missing:
        pytest.skip(missing)
    workflow = json.loads(UI_FILE.read_text())
    scorer_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "RDTRewardScorer")
    driver = cb.start_chromium(tmp_path / "profile")
    try:
        page = cb.ComfyPage(driver, comfy_server.url)
        page.open()
        report = page.load(workflow)
        assert not report.zod_alerts and not report.missing_nodes_dialogs and not report.load_error
        prepare_for_test_run(page, Path(comfy_models))
        page.set_widget(next(n["id"] for n in workflow["nodes"] if n["type"] == "EmptyLatentImage"),
                        "batch_size", 3)
        ids = page.queue()
        assert ids
        entry = comfy_server.wait(ids[0], timeout=900)
        assert (entry.get("status") or {}).get("status_str") == "success", entry.get("status")
        table = entry["outputs"][str(scorer_id)]["text"][0]
        deadline = time.monotonic() + 60
        shown = None
        while time.monotonic() < deadline:
            shown = driver.execute_script(
                "const n = window.app.graph.getNodeById(arguments[0]);"
                "const w = (n.widgets || []).find(w => w.name === 'rdt_scores');"
                "return w ? {value: w.value, saved: n.serialize().widgets_values} : null;", scorer_id)
            if shown and shown["value"]:
                break
            time.sleep(0.5)
        assert shown is not None and shown["value"] == table
        assert "combined" in shown["value"] and len(shown["value"].splitlines()) >= 4
        original = next(n for n in workflow["nodes"] if n["id"] == scorer_id)["widgets_values"]
        assert len(shown["saved"]) == len(original)  # the display widget is not serialised
    finally:
        driver.quit()
