"""The sampling nodes' pure parts, without ComfyUI: node specs, schedule choices, forward-time LoRA, patch plans."""

import sys
import types

import pytest
import torch

import comfy_rdt_nodes
from comfy_rdt_nodes import nodes_sampling as ns
from comfy_rdt_nodes.forward_lora import LowRankTerm, TunedRows, attach_row_loras, merged_weight
from comfy_rdt_nodes.lora_patches import extra_patches, low_rank_term, plan_forward_patches
from rdt_lib.mix import step_index
from rdt_lib.schedules import parse_schedule


# --- node registration and input specs ------------------------------------------------------------------------

def test_pack_imports_without_comfyui_and_registers_the_nodes():
    assert "comfy" not in sys.modules  # importing the pack did not import ComfyUI
    for name in ("RDTDualModelKSampler", "RDTDualModelGuider", "RDTSchedule"):
        cls = comfy_rdt_nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "rdt/sampling"
        assert name in comfy_rdt_nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert callable(getattr(cls, cls.FUNCTION))


@pytest.fixture
def fake_sampler_lists(monkeypatch):
    """ComfyUI's ``comfy.samplers`` module reduced to the two lists the input specs read."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = type("KSampler", (), {"SAMPLERS": ["euler", "heun", "dpmpp_2m"], "SCHEDULERS": ["normal", "karras"]})
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    return samplers.KSampler


def test_ksampler_inputs_follow_the_issue_and_comfyui_lists(fake_sampler_lists):
    spec = ns.RDTDualModelKSampler.INPUT_TYPES()
    req, opt = spec["required"], spec["optional"]
    assert list(req) == ["base_model", "positive", "negative", "latent_image", "seed", "steps", "cfg_base",
                         "cfg_tuned", "sampler_name", "scheduler", "denoise", "schedule"]
    assert req["sampler_name"][0] is fake_sampler_lists.SAMPLERS
    assert req["scheduler"][0] is fake_sampler_lists.SCHEDULERS
    assert req["schedule"][1]["default"] == "switch@0.75"
    assert req["steps"][1]["min"] == 1 and req["cfg_base"][1]["max"] == 100.0
    assert opt["tuned_model"][0] == "MODEL" and opt["schedule_input"][0] == "RDT_SCHEDULE"
    assert ns.RDTDualModelKSampler.RETURN_TYPES == ("LATENT",)


def test_guider_and_schedule_specs():
    g = ns.RDTDualModelGuider.INPUT_TYPES()
    assert set(g["required"]) == {"base_model", "positive", "negative", "cfg_base", "cfg_tuned", "schedule"}
    assert ns.RDTDualModelGuider.RETURN_TYPES == ("GUIDER",)
    s = ns.RDTSchedule.INPUT_TYPES()["required"]
    assert s["kind"][0] == ["switch at step", "switch at fraction", "linear", "power", "cosine", "keyframes",
                            "base", "tuned", "custom spec"]
    assert ns.RDTSchedule.RETURN_TYPES == ("RDT_SCHEDULE", "IMAGE")


def test_validate_inputs_reports_bad_specs_with_the_accepted_forms():
    assert ns.RDTDualModelKSampler.VALIDATE_INPUTS(schedule="power:2") is True
    assert ns.RDTDualModelKSampler.VALIDATE_INPUTS(schedule=None) is True
    msg = ns.RDTDualModelKSampler.VALIDATE_INPUTS(schedule="powr:2")
    assert isinstance(msg, str) and "unknown schedule 'powr'" in msg and "switch:K" in msg
    msg = ns.RDTDualModelGuider.VALIDATE_INPUTS(schedule="switch@1.5")
    assert isinstance(msg, str) and "[0, 1]" in msg
    assert ns.RDTSchedule.VALIDATE_INPUTS(kind="power", value=2.0, text="") is True
    msg = ns.RDTSchedule.VALIDATE_INPUTS(kind="switch at step", value=2.5, text="")
    assert isinstance(msg, str) and "integer" in msg
    msg = ns.RDTSchedule.VALIDATE_INPUTS(kind="keyframes", value=0.0, text="0=0,0.5")
    assert isinstance(msg, str) and "P=W" in msg


@pytest.mark.parametrize("kind,value,text,spec", [
    ("switch at step", 30.0, "", "switch:30"),
    ("switch at fraction", 0.6, "", "switch@0.6"),
    ("linear", 5.0, "", "linear"),
    ("power", 2.0, "", "power:2"),
    ("cosine", 0.0, "", "cosine"),
    ("keyframes", 0.0, "0=0,0.5=0.2,1=1", "keyframes:0=0,0.5=0.2,1=1"),
    ("base", 0.0, "", "base"),
    ("tuned", 0.0, "", "tuned"),
    ("custom spec", 0.0, "power:1.5", "power:1.5"),
])
def test_schedule_choices_map_to_specs(kind, value, text, spec):
    assert ns.schedule_from_choice(kind, value, text) == parse_schedule(spec)


def test_schedule_choice_errors_and_override():
    with pytest.raises(ValueError, match="accepted"):
        ns.schedule_from_choice("zigzag", 0.0, "")
    with pytest.raises(ValueError, match="> 0"):
        ns.schedule_from_choice("power", 0.0, "")
    with pytest.raises(ValueError, match="custom spec"):
        ns.schedule_from_choice("custom spec", 0.0, "  ")
    sched = parse_schedule("linear")
    assert ns.resolve_schedule("switch:3", sched) is sched
    assert ns.resolve_schedule("switch:3", None) == parse_schedule("switch:3")
    with pytest.raises(ValueError, match="RDT_SCHEDULE"):
        ns.resolve_schedule("switch:3", "linear")


def test_schedule_node_plot_shows_the_weights():
    node = ns.RDTSchedule()
    sched, img = node.build("switch at step", 5.0, "", 10)
    assert sched == parse_schedule("switch:5")
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    _, base_img = node.build("base", 0.0, "", 10)
    _, tuned_img = node.build("tuned", 0.0, "", 10)
    # bars are blue: the tuned-only plot has far more blue-dominant pixels than the base-only plot
    def blue(im):
        return int(((im[..., 2] - im[..., 0]) > 0.3).sum())
    assert blue(tuned_img) > 10 * max(blue(base_img), 1)
    assert blue(tuned_img) > blue(img) > blue(base_img)


# --- step index on ComfyUI-shaped sigma lists -------------------------------------------------------------------

def test_step_index_on_comfyui_style_lists():
    # dpm_2 on KSampler: one sigma more, penultimate dropped; midpoint evaluations stay in their step
    sig = [14.61, 6.0, 2.5, 0.9, 0.0]
    mids = [(sig[i] * sig[i + 1]) ** 0.5 for i in range(3)]
    assert [step_index(sig, m) for m in mids] == [0, 1, 2]
    # Heun-style repeats: second evaluation at sigmas[i+1] belongs to step i+1; duplicated entries -> the first
    dup = [10.0, 4.0, 4.0, 1.0, 0.0]
    assert [step_index(dup, s) for s in (10.0, 4.0, 4.0, 1.0)] == [0, 1, 1, 3]
    # denoise < 1: KSampler keeps the last steps+1 of a longer list; indices count the steps run
    full = torch.linspace(14.0, 0.0, 9)
    tail = full[-5:]
    assert [step_index(tail, s) for s in tail[:-1]] == [0, 1, 2, 3]


# --- forward-time LoRA on plain torch modules --------------------------------------------------------------------

def _term(out_dim, in_shape, rank, scale, seed):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out_dim, rank, generator=g) * 0.5
    down = torch.randn(rank, *in_shape, generator=g) * 0.5
    return LowRankTerm(up=up, down=down, scale=scale)


def _reference(module, terms):
    import copy

    ref = copy.deepcopy(module)
    with torch.no_grad():
        ref.weight.copy_(merged_weight(module.weight, terms))
    return ref


@pytest.mark.parametrize("layer,x_shape,in_shape", [
    (lambda: torch.nn.Linear(6, 5), (4, 3, 6), (6,)),
    (lambda: torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 9), (3, 3, 3)),
    (lambda: torch.nn.Conv2d(3, 5, 1), (4, 3, 7, 7), (3,)),  # linear-shaped factors on a 1x1 conv (kohya proj_in)
    (lambda: torch.nn.Conv1d(3, 4, 3, padding="same"), (4, 3, 11), (3, 3)),
])
def test_row_lora_matches_merged_weights_on_the_tuned_rows(layer, x_shape, in_shape):
    torch.manual_seed(0)
    module = layer()
    terms = [_term(module.weight.shape[0], in_shape, 2, 0.7, 1), _term(module.weight.shape[0], in_shape, 3, -0.3, 2)]
    ref = _reference(module, terms)
    x = torch.randn(*x_shape)
    base_out, tuned_out = module(x), ref(x)
    assert (base_out - tuned_out).abs().max() > 1e-2  # the LoRA changes the output
    rows = TunedRows()
    with attach_row_loras([(module, terms)], rows):
        assert torch.equal(module(x), base_out)  # off: untouched
        with rows.scoped(rows.set_all):
            assert (module(x) - tuned_out).abs().max() <= 1e-5
        # 4 rows in 2 chunks [chunk0: rows 0-1, chunk1: rows 2-3]; chunk 1 tuned
        with rows.scoped(rows.set_chunks, [1], 2):
            got = module(x)
        assert (got[:2] - base_out[:2]).abs().max() <= 1e-6
        assert (got[2:] - tuned_out[2:]).abs().max() <= 1e-5
        with rows.scoped(rows.set_chunks, [0, 3], 4):
            got = module(x)
        assert (got[[0, 3]] - tuned_out[[0, 3]]).abs().max() <= 1e-5
        assert (got[[1, 2]] - base_out[[1, 2]]).abs().max() <= 1e-6
        assert rows.mode == "off"
    with rows.scoped(rows.set_all):
        assert torch.equal(module(x), base_out)  # hooks removed after the block


def test_row_lora_in_a_small_network_matches_a_merged_copy():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 25, 3))
    terms = {0: [_term(8, (4, 3, 3), 2, 1.0, 3)], 2: [_term(8, (8,), 4, 0.5, 4)], 4: [_term(3, (200,), 2, 2.0, 5)]}
    import copy

    merged = copy.deepcopy(net)
    with torch.no_grad():
        for i, ts in terms.items():
            merged[i].weight.copy_(merged_weight(net[i].weight, ts))
    x = torch.randn(3, 4, 5, 5)
    rows = TunedRows()
    xx = torch.cat([x, x])  # chunk 0 base, chunk 1 tuned
    with attach_row_loras([(net[i], ts) for i, ts in terms.items()], rows):
        with rows.scoped(rows.set_chunks, [1], 2):
            out = net(xx)
    assert (net(x) - merged(x)).abs().max() > 1e-2
    assert (out[:3] - net(x)).abs().max() <= 1e-5
    assert (out[3:] - merged(x)).abs().max() <= 1e-5


def test_rows_not_divisible_by_chunks_is_an_error():
    rows = TunedRows()
    rows.set_chunks([1], 3)
    with pytest.raises(RuntimeError, match="multiple"):
        rows.row_index(4, torch.device("cpu"))
    with pytest.raises(ValueError):
        rows.set_chunks([3], 3)


def test_low_rank_term_shape_check():
    lin = torch.nn.Linear(6, 5)
    with pytest.raises(ValueError, match="do not fit"):
        _term(5, (7,), 2, 1.0, 0).check(lin, "k")
    _term(5, (6,), 2, 1.0, 0).check(lin, "k")


def test_row_lora_on_slices_of_a_fused_weight_matches_the_sliced_update():
    """A fused qkv Linear (3 x 4 outputs) with LoRAs on its q and v slices (ComfyUI's offsets (0, 0, 4) and
    (0, 8, 4)) plus one on the whole weight: the tuned rows equal a Linear whose weight got each update on its
    rows only (built by hand), the k rows move by the whole-weight term alone, the base rows are untouched."""
    torch.manual_seed(3)
    qkv = torch.nn.Linear(5, 12)
    q, v, whole = _term(4, (5,), 2, 0.8, 7), _term(4, (5,), 3, -1.2, 8), _term(12, (5,), 1, 0.5, 9)
    q.out_slice, v.out_slice = (0, 4), (8, 4)
    for t in (q, v, whole):
        t.check(qkv, "qkv")
    with torch.no_grad():
        w = qkv.weight.clone()
        w[0:4] += 0.8 * q.up @ q.down
        w[8:12] += -1.2 * v.up @ v.down
        w += 0.5 * whole.up @ whole.down
    x = torch.randn(2, 3, 5)
    expected = torch.nn.functional.linear(x, w, qkv.bias)
    base_out = qkv(x)
    assert (expected - base_out)[..., 0:4].abs().max() > 1e-2 and (expected - base_out)[..., 8:].abs().max() > 1e-2
    assert (merged_weight(qkv.weight, [q, v, whole]) - w).abs().max() <= 1e-6
    rows = TunedRows()
    with attach_row_loras([(qkv, [q, v, whole])], rows), rows.scoped(rows.set_chunks, [1], 2):
        got = qkv(x)
    assert (got[0] - base_out[0]).abs().max() <= 1e-6
    assert (got[1] - expected[1]).abs().max() <= 1e-5
    with attach_row_loras([(qkv, [v])], rows), rows.scoped(rows.set_all):
        only_v = qkv(x)
    assert torch.equal(only_v[..., :8], base_out[..., :8])  # a slice term leaves the other channels alone
    with pytest.raises(ValueError, match="output rows 10..13"):
        LowRankTerm(up=v.up, down=v.down, scale=1.0, out_slice=(10, 4)).check(qkv, "qkv")


# --- ComfyUI patch lists -> plans ---------------------------------------------------------------------------------

class _LoraAdapter:  # the attributes ComfyUI's comfy.weight_adapter.LoRAAdapter carries
    name = "lora"

    def __init__(self, up, down, alpha, mid=None, dora=None, reshape=None):
        self.weights = (up, down, alpha, mid, dora, reshape)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = torch.nn.ModuleDict({"proj": torch.nn.Conv2d(4, 6, 1), "fc": torch.nn.Linear(6, 3),
                                                    "norm": torch.nn.GroupNorm(2, 6)})


def _entry(patch, strength=1.0):
    return (strength, patch, 1.0, None, None)


def test_extra_patches_are_the_entries_after_the_base_ones():
    a, b, c = _entry("a"), _entry("b"), _entry("c")
    base = {"k1": [a]}
    tuned = {"k1": [a, b], "k2": [c]}
    assert extra_patches(base, tuned) == {"k1": [b], "k2": [c]}
    assert extra_patches(base, {"k1": [a]}) == {}
    with pytest.raises(ValueError, match="not its patches"):
        extra_patches(base, {"k1": [_entry("a")]})  # a different entry object: not the base's patch
    with pytest.raises(ValueError, match="not its patches"):
        extra_patches(base, {})


def test_low_rank_term_reads_plain_loras_only():
    up, down = torch.randn(6, 2), torch.randn(2, 4)
    t = low_rank_term(_entry(_LoraAdapter(up, down, 1.0), strength=0.5))
    assert t is not None and t.scale == pytest.approx(0.5 * 1.0 / 2)
    assert low_rank_term(_entry(_LoraAdapter(up, down, None))).scale == 1.0
    assert low_rank_term(_entry(("lora", (up, down, 4.0, None, None, None)))).scale == 2.0
    assert low_rank_term(_entry(_LoraAdapter(up, down, 1.0, dora=torch.ones(6)))) is None
    assert low_rank_term(_entry(("diff", (torch.zeros(6, 4, 1, 1),)))) is None
    assert low_rank_term((1.0, _LoraAdapter(up, down, 1.0), 0.8, None, None)) is None  # strength_model
    sliced = low_rank_term((1.0, _LoraAdapter(up, down, 2.0), 1.0, (0, 6, 6), None))  # ComfyUI's (dim, start, len)
    assert sliced is not None and sliced.out_slice == (6, 6) and sliced.scale == 1.0
    assert low_rank_term((1.0, _LoraAdapter(up, down, 2.0), 1.0, (1, 0, 4), None)) is None  # a slice of the inputs


def test_plans_rows_for_loras_and_weights_for_other_patches():
    model = _Model()
    lora = _entry(_LoraAdapter(torch.randn(6, 2), torch.randn(2, 4), 2.0))
    fc_lora = _entry(_LoraAdapter(torch.randn(3, 1), torch.randn(1, 6), None))
    plan = plan_forward_patches(model, {"diffusion_model.proj.weight": [lora], "diffusion_model.fc.weight": [fc_lora]})
    assert plan.mode == "rows" and [m for m, _ in plan.layers] == [model.diffusion_model.proj, model.diffusion_model.fc]
    diff = _entry(("diff", (torch.zeros(6),)))
    plan = plan_forward_patches(model, {"diffusion_model.proj.weight": [lora], "diffusion_model.norm.weight": [diff]})
    assert plan.mode == "weights" and set(plan.patches) == {"diffusion_model.proj.weight", "diffusion_model.norm.weight"}
    bias = _entry(("diff", (torch.zeros(6),)))
    assert plan_forward_patches(model, {"diffusion_model.proj.bias": [bias]}).mode == "weights"


def test_plan_rejects_patches_for_another_architecture():
    model = _Model()
    wrong = _entry(_LoraAdapter(torch.randn(6, 2), torch.randn(2, 8), 1.0))  # 8 inputs, the layer has 4
    with pytest.raises(ValueError, match="another architecture"):
        plan_forward_patches(model, {"diffusion_model.proj.weight": [wrong]})
    with pytest.raises(ValueError, match="does not have"):
        plan_forward_patches(model, {"diffusion_model.missing.weight": [wrong]})
    with pytest.raises(ValueError, match="another architecture"):
        plan_forward_patches(model, {"diffusion_model.fc.weight": [_entry(("diff", (torch.zeros(2, 2),)))]})


def test_plans_rows_for_loras_on_slices_of_a_fused_weight():
    """ComfyUI's SD3 / Flux key maps give the q / k / v LoRAs offsets into the fused qkv weight."""
    model = _Model()
    model.diffusion_model["qkv"] = torch.nn.Linear(4, 9)
    key = "diffusion_model.qkv.weight"
    entries = [(1.0, _LoraAdapter(torch.randn(3, 2), torch.randn(2, 4), 2.0), 1.0, (0, 3 * i, 3), None)
               for i in range(3)]
    plan = plan_forward_patches(model, {key: entries})
    assert plan.mode == "rows" and [t.out_slice for t in plan.layers[0][1]] == [(0, 3), (3, 3), (6, 3)]
    too_far = (1.0, _LoraAdapter(torch.randn(3, 2), torch.randn(2, 4), 2.0), 1.0, (0, 8, 3), None)
    with pytest.raises(ValueError, match="another architecture"):
        plan_forward_patches(model, {key: [too_far]})
    wrong_rows = (1.0, _LoraAdapter(torch.randn(5, 2), torch.randn(2, 4), 2.0), 1.0, (0, 0, 3), None)
    with pytest.raises(ValueError, match="another architecture"):
        plan_forward_patches(model, {key: [wrong_rows]})


# --- model pair checks (duck-typed ModelPatchers) ----------------------------------------------------------------

class _SD15Latent: ...


class _SDXLLatent: ...


class _BaseModel:
    def __init__(self, latent):
        self.latent_format = latent()


class _SDXLModel(_BaseModel): ...


class _Patcher:
    def __init__(self, model):
        self.model = model

    def clone(self):
        return _Patcher(self.model)


def test_model_pair_needs_one_latent_format_and_model_type():
    from comfy_rdt_nodes.model_pair import check_model_pair

    check_model_pair(_Patcher(_BaseModel(_SD15Latent)), _Patcher(_BaseModel(_SD15Latent)))
    with pytest.raises(ValueError, match="different latent formats.*_SD15Latent.*_SDXLLatent"):
        check_model_pair(_Patcher(_BaseModel(_SD15Latent)), _Patcher(_BaseModel(_SDXLLatent)))
    with pytest.raises(ValueError, match="different model types"):
        check_model_pair(_Patcher(_BaseModel(_SD15Latent)), _Patcher(_SDXLModel(_SD15Latent)))
    with pytest.raises(ValueError, match="not a ComfyUI MODEL"):
        check_model_pair(_Patcher(_BaseModel(_SD15Latent)), "model.safetensors")


def test_tuned_chunks_follow_comfyuis_batch_order():
    """calc_cond_batch may batch the conds [base+, base-, tuned+, tuned-] in any order (it pops them reversed);
    the rows of the chunks whose cond index is 2 or 3 get the LoRA."""
    from comfy_rdt_nodes.forward_lora import tuned_chunk_positions

    assert tuned_chunk_positions([3, 2, 1, 0], 2) == [0, 1]
    assert tuned_chunk_positions([2, 0], 2) == [0]  # both CFG-1 negatives skipped
    assert tuned_chunk_positions([1, 0], 2) == []
    torch.manual_seed(3)
    lin = torch.nn.Linear(4, 4)
    term = _term(4, (4,), 2, 1.0, 9)
    ref = _reference(lin, [term])
    x = torch.randn(2, 4)
    xx = torch.cat([x, x, x, x])  # chunks in batch order: conds 3, 2, 1, 0
    rows = TunedRows()
    with attach_row_loras([(lin, [term])], rows):
        with rows.scoped(rows.set_chunks, tuned_chunk_positions([3, 2, 1, 0], 2), 4):
            out = lin(xx)
    assert (out[:4] - ref(xx[:4])).abs().max() <= 1e-5
    assert (out[4:] - lin(xx[4:])).abs().max() <= 1e-6
