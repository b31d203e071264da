"""The sampling nodes in a real ComfyUI (marker ``comfyui``; fixtures ``comfy_server`` / ``comfy_models``).

References are ComfyUI's own nodes in the same server: KSampler on the base model, KSampler on the base after
LoraLoaderModelOnly, the two-KSamplerAdvanced chain. Every comparison first asserts that the references differ
from each other by far more than its tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import comfy_graphs as cg
from comfy_graphs import Graph

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
STEPS = 5
CFG_BASE, CFG_TUNED = 2.0, 1.5  # moderate CFG: the random UNet's latents are ~250 in size
TOL_BASE, TOL_TUNED = 1e-4, 1e-3


@pytest.fixture(scope="module")
def files(comfy_models):
    from comfy_checkpoint import write_tiny_sd15_checkpoint

    cg.write_kohya_lora(comfy_models / "loras" / cg.LORA)
    cg.write_kohya_lora(comfy_models / "loras" / cg.LORA_WRONG, wrong_shapes=True)
    cg.write_loha(comfy_models / "loras" / cg.LOHA)
    if not (comfy_models / "checkpoints" / cg.TINY_B).exists():
        write_tiny_sd15_checkpoint(comfy_models / "checkpoints" / cg.TINY_B, seed=1)
    return comfy_models


@pytest.fixture
def server(comfy_server, files):
    return comfy_server


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def test_object_info_lists_the_nodes_with_comfyuis_sampler_lists(server):
    info = server.object_info()
    for name in ("RDTDualModelKSampler", "RDTDualModelGuider", "RDTSchedule"):
        assert name in info and info[name]["category"] == "rdt/sampling"
    ours = info["RDTDualModelKSampler"]["input"]["required"]
    theirs = info["KSampler"]["input"]["required"]
    assert ours["sampler_name"][0] == theirs["sampler_name"][0]
    assert ours["scheduler"][0] == theirs["scheduler"][0]
    assert info["RDTSchedule"]["output"] == ["RDT_SCHEDULE", "IMAGE"]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_base_and_tuned_schedules_equal_ksampler(server, sampler):
    g = Graph()
    p = cg.base_pipeline(g)
    lora = cg.lora_model(g, p["model"])
    kw = dict(seed=SEED, steps=STEPS, sampler=sampler)
    ids = {
        "ref_base": cg.save(g, cg.ksampler(g, p, p["model"], cfg=CFG_BASE, **kw), f"rb_{sampler}"),
        "ref_tuned": cg.save(g, cg.ksampler(g, p, lora, cfg=CFG_TUNED, **kw), f"rt_{sampler}"),
        "base": cg.save(g, cg.dual(g, p, p["model"], lora, cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED, schedule="base",
                                   **kw), f"db_{sampler}"),
        "tuned": cg.save(g, cg.dual(g, p, p["model"], lora, cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED, schedule="tuned",
                                    **kw), f"dt_{sampler}"),
    }
    lat = cg.latents(server, server.run(g.nodes), ids)
    gap = _maxdiff(lat["ref_base"], lat["ref_tuned"])
    assert gap > 100 * TOL_TUNED, f"the LoRA barely changes the result ({gap})"
    assert _maxdiff(lat["base"], lat["ref_base"]) <= TOL_BASE
    assert _maxdiff(lat["tuned"], lat["ref_tuned"]) <= TOL_TUNED


def test_switch_equals_the_ksampleradvanced_chain_with_euler(server):
    k = 1
    g = Graph()
    p = cg.base_pipeline(g)
    lora = cg.lora_model(g, p["model"], strength=3.0)  # late steps change little: a strong LoRA shows the switch
    cfg = 2.0
    first = g.add("KSamplerAdvanced", model=p["model"], add_noise="enable", noise_seed=SEED, steps=STEPS, cfg=cfg,
                  sampler_name="euler", scheduler="normal", positive=p["positive"], negative=p["negative"],
                  latent_image=p["latent"], start_at_step=0, end_at_step=k, return_with_leftover_noise="enable")
    second = g.add("KSamplerAdvanced", model=lora, add_noise="disable", noise_seed=SEED, steps=STEPS, cfg=cfg,
                   sampler_name="euler", scheduler="normal", positive=p["positive"], negative=p["negative"],
                   latent_image=[first, 0], start_at_step=k, end_at_step=10000, return_with_leftover_noise="disable")
    ids = {
        "chain": cg.save(g, [second, 0], "chain"),
        "ref_base": cg.save(g, cg.ksampler(g, p, p["model"], seed=SEED, steps=STEPS, cfg=cfg, sampler="euler"), "cb"),
        "dual": cg.save(g, cg.dual(g, p, p["model"], lora, seed=SEED, steps=STEPS, cfg_base=cfg, cfg_tuned=cfg,
                                   sampler="euler", schedule=f"switch:{k}"), "cd"),
    }
    lat = cg.latents(server, server.run(g.nodes), ids)
    assert _maxdiff(lat["chain"], lat["ref_base"]) > 100 * TOL_TUNED
    assert _maxdiff(lat["dual"], lat["chain"]) <= TOL_TUNED


def test_denoise_below_one_counts_the_steps_actually_run(server):
    """KSampler with denoise 0.8 and 4 steps runs the last 4 steps of an int(4 / 0.8) = 5-step list; switch:K
    switches after K of the 4 steps run, which is the chain over steps 1..1+K and 1+K..5 of the 5-step list."""
    k, steps, denoise = 1, 4, 0.8
    total = int(steps / denoise)
    skip = total - steps
    g = Graph()
    p = cg.base_pipeline(g)
    lora = cg.lora_model(g, p["model"], strength=3.0)
    cfg = 2.0
    start = cg.ksampler(g, p, p["model"], seed=7, steps=3, cfg=cfg, sampler="euler")  # a non-empty input latent
    first = g.add("KSamplerAdvanced", model=p["model"], add_noise="enable", noise_seed=SEED, steps=total, cfg=cfg,
                  sampler_name="euler", scheduler="normal", positive=p["positive"], negative=p["negative"],
                  latent_image=start, start_at_step=skip, end_at_step=skip + k, return_with_leftover_noise="enable")
    second = g.add("KSamplerAdvanced", model=lora, add_noise="disable", noise_seed=SEED, steps=total, cfg=cfg,
                   sampler_name="euler", scheduler="normal", positive=p["positive"], negative=p["negative"],
                   latent_image=[first, 0], start_at_step=skip + k, end_at_step=10000,
                   return_with_leftover_noise="disable")
    ids = {
        "chain": cg.save(g, [second, 0], "dn_chain"),
        "ref_base": cg.save(g, cg.ksampler(g, p, p["model"], seed=SEED, steps=steps, cfg=cfg, sampler="euler",
                                           denoise=denoise, latent=start), "dn_base"),
        "dual": cg.save(g, cg.dual(g, p, p["model"], lora, seed=SEED, steps=steps, cfg_base=cfg, cfg_tuned=cfg,
                                   sampler="euler", schedule=f"switch:{k}", denoise=denoise, latent=start), "dn_dual"),
        # the same switch counted on the full 5-step list would switch one step later: a different result
        "late": cg.save(g, cg.dual(g, p, p["model"], lora, seed=SEED, steps=steps, cfg_base=cfg, cfg_tuned=cfg,
                                   sampler="euler", schedule=f"switch:{k + 1}", denoise=denoise, latent=start),
                        "dn_late"),
    }
    lat = cg.latents(server, server.run(g.nodes), ids)
    assert _maxdiff(lat["chain"], lat["ref_base"]) > 100 * TOL_TUNED
    assert _maxdiff(lat["chain"], lat["late"]) > 20 * TOL_TUNED
    assert _maxdiff(lat["dual"], lat["chain"]) <= TOL_TUNED


@pytest.mark.parametrize("tuned_kind", ["lora", "loha", "checkpoint"])
def test_one_euler_step_mixes_the_guided_predictions(server, tuned_kind):
    """With one Euler step to sigma 0 the result is the denoised prediction itself, so a constant weight w gives
    exactly (1 - w) * KSampler(base) + w * KSampler(tuned) (one-step runs): the mix, each model's own CFG and the
    batched base + tuned forward pass (LoRA), the weight-function path (LoHa) and two checkpoints checked
    against ComfyUI's own runs."""
    w = 0.25
    g = Graph()
    p = cg.base_pipeline(g)
    if tuned_kind == "checkpoint":
        tuned = [g.add("CheckpointLoaderSimple", ckpt_name=cg.TINY_B), 0]
    else:
        tuned = cg.lora_model(g, p["model"], lora=cg.LOHA if tuned_kind == "loha" else cg.LORA)
    kw = dict(seed=SEED, steps=1, sampler="euler")
    ids = {
        "ref_base": cg.save(g, cg.ksampler(g, p, p["model"], cfg=CFG_BASE, **kw), f"m_rb_{tuned_kind}"),
        "ref_tuned": cg.save(g, cg.ksampler(g, p, tuned, cfg=CFG_TUNED, **kw), f"m_rt_{tuned_kind}"),
        "mix": cg.save(g, cg.dual(g, p, p["model"], tuned, cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED,
                                  schedule=f"keyframes:0={w}", **kw), f"m_mix_{tuned_kind}"),
        "tuned": cg.save(g, cg.dual(g, p, p["model"], tuned, cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED,
                                    schedule="tuned", **kw), f"m_tuned_{tuned_kind}"),
    }
    lat = cg.latents(server, server.run(g.nodes), ids)
    assert _maxdiff(lat["ref_base"], lat["ref_tuned"]) > 100 * TOL_TUNED
    expected = (1 - w) * lat["ref_base"] + w * lat["ref_tuned"]
    assert _maxdiff(lat["mix"], expected) <= TOL_TUNED
    assert _maxdiff(lat["mix"], lat["ref_base"]) > 20 * TOL_TUNED
    assert _maxdiff(lat["tuned"], lat["ref_tuned"]) <= TOL_TUNED


def test_guider_with_sampler_custom_advanced_equals_the_ksampler_node(server):
    g = Graph()
    p = cg.base_pipeline(g)
    lora = cg.lora_model(g, p["model"])
    sched = g.add("RDTSchedule", kind="power", value=2.0, text="", plot_steps=STEPS)
    guider = g.add("RDTDualModelGuider", base_model=p["model"], tuned_model=lora, positive=p["positive"],
                   negative=p["negative"], cfg_base=CFG_BASE, cfg_tuned=CFG_TUNED, schedule="base",
                   schedule_input=[sched, 0])
    noise = g.add("RandomNoise", noise_seed=SEED)
    sampler = g.add("KSamplerSelect", sampler_name="dpmpp_2m")
    sigmas = g.add("BasicScheduler", model=p["model"], scheduler="normal", steps=STEPS, denoise=1.0)
    custom = g.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
                   sigmas=[sigmas, 0], latent_image=p["latent"])
    g.add("PreviewImage", images=[sched, 1])
    ids = {
        "custom": cg.save(g, [custom, 0], "g_custom"),
        "node": cg.save(g, cg.dual(g, p, p["model"], lora, seed=SEED, steps=STEPS, cfg_base=CFG_BASE,
                                   cfg_tuned=CFG_TUNED, sampler="dpmpp_2m", schedule="power:2"), "g_node"),
        "ref_base": cg.save(g, cg.ksampler(g, p, p["model"], seed=SEED, steps=STEPS, cfg=CFG_BASE,
                                           sampler="dpmpp_2m"), "g_base"),
    }
    entry = server.run(g.nodes)
    lat = cg.latents(server, entry, ids)
    assert _maxdiff(lat["node"], lat["ref_base"]) > 100 * TOL_BASE
    assert _maxdiff(lat["custom"], lat["node"]) <= TOL_BASE
    assert server.output_files(entry, kind="images"), "the schedule plot was not shown"


def _good_graph() -> dict:
    g = Graph()
    p = cg.base_pipeline(g)
    cg.save(g, cg.dual(g, p, p["model"], cg.lora_model(g, p["model"]), seed=1, steps=2, cfg_base=2.0, cfg_tuned=2.0,
                       sampler="euler", schedule="linear"), "good")
    return g.nodes


def _bad(kind: str) -> dict:
    g = Graph()
    p = cg.base_pipeline(g)
    kw = dict(seed=1, steps=2, cfg_base=2.0, cfg_tuned=2.0, sampler="euler", schedule="linear")
    tuned = cg.lora_model(g, p["model"])
    if kind == "schedule":
        kw["schedule"] = "powr:2"
    elif kind == "no_tuned":
        tuned = None
    elif kind == "cfg":
        kw["cfg_base"] = 150.0
    elif kind == "steps":
        kw["steps"] = 0
    elif kind == "wrong_lora":
        tuned = cg.lora_model(g, p["model"], lora=cg.LORA_WRONG)
    cg.save(g, cg.dual(g, p, p["model"], tuned, **kw), f"bad_{kind}")
    return g.nodes


@pytest.mark.parametrize("kind,words", [
    ("schedule", ["unknown schedule 'powr'", "accepted", "switch:K"]),
    ("no_tuned", ["needs a tuned model", "connect one"]),
    ("cfg", ["cfg_base", "100"]),
    ("steps", ["steps", "1"]),
    ("wrong_lora", ["do not fit the base weight", "another architecture"]),
])
def test_bad_inputs_give_node_errors_and_the_server_keeps_serving(server, kind, words):
    from comfyui_server import ComfyNodeError

    with pytest.raises(ComfyNodeError) as err:
        server.run(_bad(kind))
    text = json.dumps(err.value.error)
    for word in words:
        assert word in text, (word, text[:2000])
    server.run(_good_graph())


def _substitute(api: dict) -> dict:
    """A shipped API workflow made small and pointed at the test files."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        ins = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            ins["ckpt_name"] = cg.TINY_B if "finetune" in ins["ckpt_name"].lower() else cg.TINY
        if "lora_name" in ins:
            ins["lora_name"] = cg.LORA
        for key in ("width", "height"):
            if key in ins and not isinstance(ins[key], list):
                ins[key] = 64
        if "steps" in ins and not isinstance(ins["steps"], list):
            ins["steps"] = 3
        if "plot_steps" in ins and not isinstance(ins["plot_steps"], list):
            ins["plot_steps"] = 3
    return api


# The sampling family's workflows (scripts/make_workflows.py); the reward and training workflows need tiny reward
# files and run in their own families' tests (test_comfyui_reward_nodes.py, the browser harness).
SAMPLING_WORKFLOWS = ("combined_generation", "aig_schedules_grid", "two_checkpoints")
API_WORKFLOWS = [REPO / "workflows" / "api" / f"{name}.json" for name in SAMPLING_WORKFLOWS]


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=[p.stem for p in API_WORKFLOWS])
def test_shipped_api_workflows_run(server, path):
    entry = server.run(_substitute(json.loads(path.read_text())), timeout=900)
    assert entry["outputs"], "the workflow produced no outputs"


def test_shipped_workflows_are_served_as_templates(server):
    """ComfyUI lists a pack's workflows/ folder (top-level .json files) under /workflow_templates."""
    from comfyui_server import PACK_LINK_NAME

    templates = server.get_json("/workflow_templates")
    ui_names = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(templates.get(PACK_LINK_NAME, [])) == ui_names
    assert "combined_generation" in ui_names
