"""Every shipped UI-format workflow (``workflows/*.json`` with ``nodes`` and ``links``) in ComfyUI's own frontend,
in headless Chromium: loaded as a drop loads it (``app.loadGraphData``), it opens no "missing nodes" dialog,
every node type is registered, node / link counts and widget values are those of the file, the frontend's
schema check raises no alert; then it is queued from the page and runs on the random checkpoint (checkpoint,
latent size and missing LoRA files swapped for test ones), and a screenshot is saved per workflow under
``outputs/tests/browser/comfyui-<version>/`` (``RDT_TEST_OUTPUT`` to change).

A workflow of core nodes only, written by the test, proves the harness whatever ``workflows/`` holds; two
broken variants of it prove that the missing-nodes and schema checks fire.

Needs Chromium, chromedriver and selenium (``.ci/run`` installs them); without them these tests are skipped with
one line saying what to install, unless ``RDT_REQUIRE_BROWSER=1`` (CI), which makes that a failure.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import pytest

import comfyui_browser as cb
import comfyui_server as cs

WORKFLOWS = cs.REPO_ROOT / "workflows"
SCREENSHOTS = Path(os.environ.get("RDT_TEST_OUTPUT", cs.REPO_ROOT / "outputs" / "tests")) / "browser"
LATENT_SIZE_NODES = {"EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"}
TEST_SIZE = 64

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]


# ---- the harness's own workflow (core nodes only) ------------------------------------------------------

def _node(nid, ntype, order, pos, inputs, outputs, widgets):
    return {"id": nid, "type": ntype, "pos": list(pos), "size": [320, 130], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": ntype},
            "widgets_values": widgets}


def core_workflow() -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler <- EmptyLatentImage -> SaveLatent, UI format 0.4."""
    links = [
        [1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
        [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
        [7, 5, 0, 6, 0, "LATENT"],
    ]
    nodes = [
        _node(1, "CheckpointLoaderSimple", 0, (20, 200), [], [
            {"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
            {"name": "CLIP", "type": "CLIP", "links": [2, 3], "slot_index": 1},
            {"name": "VAE", "type": "VAE", "links": None, "slot_index": 2}], [cs.TINY_CHECKPOINT]),
        _node(2, "CLIPTextEncode", 1, (400, 60), [{"name": "clip", "type": "CLIP", "link": 2}],
              [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4], "slot_index": 0}],
              ["a photo of a cat"]),
        _node(3, "CLIPTextEncode", 2, (400, 260), [{"name": "clip", "type": "CLIP", "link": 3}],
              [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5], "slot_index": 0}], ["blurry"]),
        _node(4, "EmptyLatentImage", 3, (400, 460), [],
              [{"name": "LATENT", "type": "LATENT", "links": [6], "slot_index": 0}], [64, 64, 1]),
        _node(5, "KSampler", 4, (800, 200), [
            {"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
            {"name": "negative", "type": "CONDITIONING", "link": 5},
            {"name": "latent_image", "type": "LATENT", "link": 6}],
            [{"name": "LATENT", "type": "LATENT", "links": [7], "slot_index": 0}],
            [12345, "fixed", 4, 5.5, "euler", "normal", 1.0]),
        _node(6, "SaveLatent", 5, (1200, 200), [{"name": "samples", "type": "LATENT", "link": 7}], [],
              ["rdt_browser_core"]),
    ]
    return {"id": "7d0c4c1e-3c0e-4c55-9a44-000000000001", "revision": 0, "last_node_id": 6, "last_link_id": 7,
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def _cases() -> list:
    cases = [pytest.param(None, id="core-harness")]
    for path in cb.ui_workflow_files(WORKFLOWS):
        cases.append(pytest.param(path, id=path.stem))
    return cases


# ---- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(request):
    missing = cb.browser_missing()
    if missing:
        pytest.skip(missing)
    server = request.getfixturevalue("comfy_server")
    driver = cb.start_chromium(request.getfixturevalue("tmp_path_factory").mktemp("chromium-profile"))
    try:
        p = cb.ComfyPage(driver, server.url)
        p.open()
        yield p
    finally:
        driver.quit()


# ---- checks ----------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_loaded(report: cb.LoadReport, workflow: dict, name: str) -> None:
    """The load checks shared by every workflow (a list of every problem, not just the first)."""
    problems = []
    if report.load_error:
        problems.append(f"loadGraphData failed: {report.load_error}")
    if report.missing_nodes_dialogs:
        problems.append(f"missing-nodes dialog: {report.missing_nodes_dialogs}")
    unregistered = sorted({n["type"] for n in workflow["nodes"]} - report.registered_types)
    if unregistered:
        problems.append(f"node types not registered: {unregistered}")
    if report.node_count != len(workflow["nodes"]):
        problems.append(f"{report.node_count} nodes on the page, {len(workflow['nodes'])} in the file")
    if report.link_count != len(workflow["links"]):
        problems.append(f"{report.link_count} links on the page, {len(workflow['links'])} in the file")
    for node in workflow["nodes"]:
        saved = node.get("widgets_values")
        if saved is None:
            continue
        got = report.widgets_values.get(str(node["id"]))
        if not _same(got, saved):
            problems.append(f"node {node['id']} ({node['type']}): widgets {got!r} on the page, {saved!r} saved")
    if report.zod_alerts:
        problems.append(f"schema alert: {report.zod_alerts}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def _write_stand_in_lora(path: Path) -> None:
    """A rank-1 kohya LoRA on one attention projection of the tiny checkpoint (small, but it loads)."""
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_up.weight": torch.randn(320, 1, generator=g) * 0.01,
               f"{key}.lora_down.weight": torch.randn(1, 320, generator=g) * 0.01,
               f"{key}.alpha": torch.tensor(1.0)}, str(path))


def _write_tiny_reward(rewards_dir: Path, reward: str) -> str:
    """A tiny random-weight reward of that name in models/rewards; returns its weights choice ("tiny-<name>/")."""
    import reward_fixtures

    return reward_fixtures.make_tiny_reward(reward, rewards_dir).name + "/"


# A shipped training workflow trains for real (hundreds of steps at 512 px); in the test it trains a token run.
TRAIN_TEST_SETTINGS = {"steps": 2, "grad_accumulation": 1, "sampling_steps": 3, "resolution": 64,
                       "if_exists": "overwrite"}  # an earlier workflow may have left a stand-in LoRA of that name


def prepare_for_test_run(page: cb.ComfyPage, models_dir: Path) -> list[str]:
    """Point the loaded graph at the test models, as a user would edit widgets: every ``ckpt_name`` at the tiny
    checkpoint, latent sizes at 64, every ``lora_name`` not on the host at a stand-in LoRA of that name, every
    reward loader's missing or hub (``default``) ``weights`` at a tiny reward of its reward name, and a training
    node's length and size at :data:`TRAIN_TEST_SETTINGS`.
    Returns what was changed."""
    changes = []
    for node in page.widgets():
        for w in node["widgets"]:
            name, value = w["name"], w["value"]
            if name == "ckpt_name" and value != cs.TINY_CHECKPOINT:
                page.set_widget(node["id"], name, cs.TINY_CHECKPOINT)
                changes.append(f"{node['type']}#{node['id']}.ckpt_name: {value} -> {cs.TINY_CHECKPOINT}")
            elif node["type"] in LATENT_SIZE_NODES and name in ("width", "height") and value != TEST_SIZE:
                page.set_widget(node["id"], name, TEST_SIZE)
                changes.append(f"{node['type']}#{node['id']}.{name}: {value} -> {TEST_SIZE}")
            elif (name == "lora_name" and isinstance(value, str) and value
                  and not (models_dir / "loras" / value).exists()):
                _write_stand_in_lora(models_dir / "loras" / value)
                changes.append(f"{node['type']}#{node['id']}.lora_name: stand-in file {value}")
            elif node["type"] == "RDTTrainRewardLoRA" and name in TRAIN_TEST_SETTINGS \
                    and value != TRAIN_TEST_SETTINGS[name]:
                page.set_widget(node["id"], name, TRAIN_TEST_SETTINGS[name])
                changes.append(f"{node['type']}#{node['id']}.{name}: {value} -> {TRAIN_TEST_SETTINGS[name]}")
            elif node["type"] == "RDTRewardModelLoader" and name == "weights" and (value == "default" or not (
                    models_dir / "rewards" / value).exists()):  # "default" is the hub: never reachable here
                reward = next(x["value"] for x in node["widgets"] if x["name"] == "reward")
                tiny = _write_tiny_reward(models_dir / "rewards", reward)
                page.set_widget(node["id"], name, tiny)
                changes.append(f"{node['type']}#{node['id']}.weights: {value} -> {tiny}")
    return changes


# ---- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _cases())
def test_workflow_loads_and_runs_in_the_browser(page, comfy_server, comfy_models, path):
    if path is None:
        name, workflow = "core-harness", core_workflow()
    else:
        name = path.stem
        workflow = json.loads(path.read_text(encoding="utf-8"))
    report = page.load(workflow)
    check_loaded(report, workflow, name)

    prepare_for_test_run(page, comfy_models)
    before = set(comfy_server.get_json("/history"))
    prompt_ids = page.queue()
    if not prompt_ids:  # the page's api wrapper saw nothing: fall back to what /history gained
        deadline = time.monotonic() + 600
        while not (set(comfy_server.get_json("/history")) - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        prompt_ids = sorted(set(comfy_server.get_json("/history")) - before)
    assert prompt_ids, f"{name}: queueing from the page produced no prompt"
    print(f"{name}: queued {prompt_ids} from the page")
    for pid in prompt_ids:
        entry = comfy_server.wait(pid, timeout=900)
        status = entry.get("status") or {}
        errors = [d for ev, d in status.get("messages", []) if ev == "execution_error"]
        assert status.get("status_str") == "success", f"{name}: the run failed: {errors or status}"
        assert entry.get("outputs"), f"{name}: the run produced no outputs"
        if path is None:
            latents = comfy_server.output_files(entry, node_id="6", kind="latents")
            assert latents and cs.read_latent(latents[0]).shape == (1, 4, 8, 8)
    shot = page.screenshot(SCREENSHOTS / f"comfyui-{comfy_server.version or 'unknown'}" / f"{name}.png")
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"


def test_harness_sees_a_missing_node(page, comfy_server):
    wf = core_workflow()
    wf["nodes"][5]["type"] = "RdtNoSuchNodeForTheHarness"
    report = page.load(wf)
    try:
        assert report.missing_nodes_dialogs, "no missing-nodes dialog for an unknown node type"
        assert "RdtNoSuchNodeForTheHarness" in report.missing_nodes_dialogs[0]
        # The two hosts' frontends title the dialog differently; each host shows its own title.
        expected = cb.MISSING_NODES_TITLES["1.27" if comfy_server.version == "0.3.64" else "1.32"]
        assert expected in report.missing_nodes_dialogs[0], (comfy_server.version, report.missing_nodes_dialogs)
        assert "RdtNoSuchNodeForTheHarness" not in report.registered_types
        with pytest.raises(AssertionError, match="missing-nodes dialog"):
            check_loaded(report, wf, "broken")
    finally:
        page.dismiss_dialogs()


def test_harness_sees_a_schema_alert(page):
    wf = copy.deepcopy(core_workflow())
    wf["extra"]["reroutes"] = None  # the frontend's schema expects an array here (SPEC 5.3)
    report = page.load(wf)
    try:
        assert report.zod_alerts, f"no schema alert for extra.reroutes = null; alerts seen: {report.alerts}"
        with pytest.raises(AssertionError, match="schema alert"):
            check_loaded(report, wf, "broken")
    finally:
        page.dismiss_dialogs()
        page.driver.execute_script("window.__rdt.alerts = [];")
