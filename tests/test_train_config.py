"""The trainer configuration: presets, overrides, type checks, cross-field validation, help and TOML output."""

from __future__ import annotations

import re
import sys

import pytest

from rdt_lib.train.config import (
    ConfigError,
    TrainConfig,
    all_keys,
    config_hash,
    config_to_dict,
    format_help,
    list_presets,
    load_config,
    parse_override,
    preset_path,
    setting_specs,
    to_toml,
    validate_config,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS = ["draftplus_sd15_pickscore", "imagerefl_sd15_hpsv21", "refl_sd15_imagereward", "r0_sd15_multireward",
           "tiny_cpu"]


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ presets


def test_shipped_presets_are_listed_and_found():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        assert preset_path(name).is_file() and preset_path(name + ".toml") == preset_path(name)
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny_gpu'.*did you mean 'tiny_cpu'"):
        preset_path("tiny_gpu")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    config = load_config([preset_path(name)], check_inputs=False)
    assert isinstance(config, TrainConfig)
    assert load_config([name], check_inputs=False) == config  # preset names work as config files


def test_presets_with_their_inputs_pass_the_input_checks(tmp_path):
    prompts = _write(tmp_path, "prompts.txt", "a cat\na dog\n")
    (tmp_path / "coco").mkdir()
    model_dir = tmp_path / "tiny_sd"
    model_dir.mkdir()
    inputs = {
        "draftplus_sd15_pickscore": [f"data.prompts_file={prompts}"],
        "refl_sd15_imagereward": [f"data.prompts_file={prompts}"],
        "r0_sd15_multireward": [f"data.prompts_file={prompts}"],
        "imagerefl_sd15_hpsv21": [f"data.dataset={tmp_path / 'coco'}"],
        "tiny_cpu": [f"model.path={model_dir}"],
    }
    for name, overrides in inputs.items():
        load_config([name], overrides)  # hub ids such as stable-diffusion-v1-5/... are not looked up
    with pytest.raises(ConfigError, match="model.path is empty"):
        load_config(["tiny_cpu"])
    with pytest.raises(ConfigError, match="needs training prompts"):
        load_config(["draftplus_sd15_pickscore"])


def test_preset_values_follow_the_papers():
    d = load_config(["draftplus_sd15_pickscore"], check_inputs=False)
    assert (d.run.objective, d.objective.num_steps, d.objective.k) == ("draft", 25, 1)
    assert d.regularizers.kl_coeff > 0 and [r.name for r in d.rewards] == ["pickscore"]
    assert (d.lora.rank, d.optim.lr, d.optim.weight_decay, d.optim.grad_clip) == (32, 2.5e-4, 0.005, 10.0)
    assert (d.optim.ema_decay, d.sampling.cfg_scale, d.sampling.scheduler, d.sampling.eta) == (0.9999, 7.5, "ddim", 0.0)
    assert d.optim.batch_size * d.optim.grad_accum == 64 and d.run.max_steps == 4000

    i = load_config(["imagerefl_sd15_hpsv21"], check_inputs=False)
    assert (i.run.objective, i.objective.num_steps, i.objective.refl_stop_range) == ("imagerefl", 40, [30, 39])
    assert (i.objective.imagerefl_start_step, i.objective.diffusion_loss_weight, i.objective.loss_scale) == (30, 0.01, 0.001)
    assert (i.optim.lr, i.optim.batch_size, i.optim.grad_accum, i.optim.mixed_precision) == (3e-4, 8, 4, "bf16")
    # ImageReFL: HPS scale 1 on the raw cosine; rdt's hpsv2.1 score is 100 x cosine, hence 0.01
    assert [(r.name, r.scale, r.offset) for r in i.rewards] == [("hpsv2.1", 0.01, 0.0)]

    r = load_config(["refl_sd15_imagereward"], check_inputs=False)
    assert (r.run.objective, r.objective.num_steps, r.objective.refl_stop_range) == ("refl", 40, [30, 39])
    assert (r.objective.reward_loss, r.objective.hinge_margin, r.objective.loss_scale) == ("hinge", 2.0, 0.001)
    assert [x.name for x in r.rewards] == ["imagereward"]

    z = load_config(["r0_sd15_multireward"], check_inputs=False)
    assert sorted(x.name for x in z.rewards) == ["clipscore", "hpsv2.1", "imagereward"]
    assert z.regularizers.per_reward_grad_norm and z.regularizers.l2_init_coeff > 0
    assert len(z.regularizers.random_eta_range) == 2 and z.objective.k == "all"


# ---------------------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed_and_later_ones_win(tmp_path):
    base = _write(tmp_path, "base.toml", '[optim]\nlr = 0.1\nbatch_size = 4\n[run]\nmax_steps = 7\n')
    top = _write(tmp_path, "top.toml", '[optim]\nlr = 0.2\n')
    c = load_config(
        [base, top],
        [
            "optim.lr=1",  # int literal for a float field
            "optim.lr=3e-4",  # later override wins
            "objective.k=all",  # not TOML -> plain text
            "data.prompts=[\"a cat\", 'a dog']",
            "model.path=2024",  # a string field keeps the text
            "run.output_dir=runs/1e-4",
            "logging.tensorboard=false",
            "optim.betas=[0.5, 0.9]",
            "rewards.0.weight=2",
            'rewards.1={name = "clipscore", weight = 0.5}',
            "rewards.1.path=/weights/clip",
        ],
        check_inputs=False,
    )
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.optim.batch_size == 4 and c.run.max_steps == 7  # untouched keys of earlier files survive
    assert c.objective.k == "all"
    assert c.data.prompts == ["a cat", "a dog"]
    assert c.model.path == "2024" and c.run.output_dir == "runs/1e-4"
    assert c.logging.tensorboard is False
    assert c.optim.betas == [0.5, 0.9]
    assert [(r.name, r.weight, r.path) for r in c.rewards] == [("pickscore", 2.0, ""), ("clipscore", 0.5, "/weights/clip")]
    assert load_config([], ["optim.lr=1"], check_inputs=False).optim.lr == 1.0
    assert isinstance(load_config([], ["optim.lr=1"], check_inputs=False).optim.lr, float)


def test_later_file_replaces_lists_and_merges_tables(tmp_path):
    a = _write(tmp_path, "a.toml", '[[rewards]]\nname = "pickscore"\n[[rewards]]\nname = "clipscore"\n'
                                   '[sampling]\ncfg_scale = 3.0\neta = 0.5\n')
    b = _write(tmp_path, "b.toml", '[[rewards]]\nname = "aesthetic"\n[sampling]\ncfg_scale = 4.0\n')
    c = load_config([a, b], check_inputs=False)
    assert [r.name for r in c.rewards] == ["aesthetic"]
    assert (c.sampling.cfg_scale, c.sampling.eta) == (4.0, 0.5)


def test_yaml_files_are_read(tmp_path):
    pytest.importorskip("yaml")
    y = _write(tmp_path, "c.yaml", "optim:\n  lr: 0.001\nrewards:\n  - name: hpsv2\n    weight: 3\n")
    c = load_config([y], check_inputs=False)
    assert c.optim.lr == 0.001 and [(r.name, r.weight) for r in c.rewards] == [("hpsv2", 3.0)]


def test_parse_override():
    assert parse_override("optim.lr = 1e-4") == ("optim.lr", 1e-4, "1e-4")
    assert parse_override("data.prompts_file=a=b.txt") == ("data.prompts_file", "a=b.txt", "a=b.txt")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("optim.lr")


# ------------------------------------------------------------------------------------------------------- errors


def test_unknown_keys_suggest_the_closest_valid_key(tmp_path):
    bad = _write(tmp_path, "bad.toml", "[optim]\nweight_decy = 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'optim\.weight_decy'; did you mean 'optim\.weight_decay'\?"):
        load_config([bad], check_inputs=False)
    misplaced = _write(tmp_path, "misplaced.toml", "[lora]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora\.lr'; did you mean 'optim\.lr'\?"):
        load_config([misplaced], check_inputs=False)
    section = _write(tmp_path, "section.toml", "[optimizer]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'; did you mean 'optim'\?"):
        load_config([section], check_inputs=False)
    reward = _write(tmp_path, "reward.toml", '[[rewards]]\nname = "pickscore"\nwieght = 2\n')
    with pytest.raises(ConfigError, match=r"unknown key 'rewards\.0\.wieght'; did you mean 'rewards\.0\.weight'\?"):
        load_config([reward], check_inputs=False)
    with pytest.raises(ConfigError, match=r"unknown key 'sampling\.cfg'; did you mean 'sampling\.cfg_scale'\?"):
        load_config([], ["sampling.cfg=3"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"unknown key 'objectiv\.k'; did you mean 'objective'\?"):
        load_config([], ["objectiv.k=3"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'; did you mean 'optim\.lr'\?"):
        load_config([], ["optim.learning_rate=3"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"'rewards\.3\.name': rewards has 1 entries"):
        load_config([], ["rewards.3.name=x"], check_inputs=False)


def test_wrong_types_name_key_expected_type_and_value(tmp_path):
    f = _write(tmp_path, "t.toml", '[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"optim\.lr: expected number, got str 'fast'"):
        load_config([f], check_inputs=False)
    with pytest.raises(ConfigError, match=r"run\.max_steps: expected integer, got float 1\.5"):
        load_config([], ["run.max_steps=1.5"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"logging\.tensorboard: expected boolean \(true/false\), got int 1"):
        load_config([], ["logging.tensorboard=1"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"objective\.k: expected integer or \"all\", got str 'most'"):
        load_config([], ["objective.k=most"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"data\.prompts: expected list of strings, got str 'a cat'"):
        load_config([], ["data.prompts=a cat"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"data\.prompts\.1: expected string, got int 3"):
        load_config([], ["data.prompts=['a', 3]"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"optim: expected a table \[optim\], got int 3"):
        load_config([], ["optim=3"], check_inputs=False)


def test_unknown_objective_and_choices():
    with pytest.raises(ConfigError, match=r"run\.objective: 'drafty' is not one of draft, draft-lv, refl, imagerefl "
                                          r"\(did you mean 'draft'\?\)"):
        load_config([], ["run.objective=drafty"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"optim\.mixed_precision: 'fp8' is not one of no, fp16, bf16"):
        load_config([], ["optim.mixed_precision=fp8"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"sampling\.scheduler: 'dpm' is not one of"):
        load_config([], ["sampling.scheduler=dpm"], check_inputs=False)
    # the accepted scheduler names can be passed in
    load_config([], ["sampling.scheduler=dpm"], known_schedulers=["dpm"], check_inputs=False)


def test_missing_dataset_folder_for_imagerefl(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(ConfigError, match=r"data\.dataset folder '.*no_such_folder' does not exist"):
        load_config(["imagerefl_sd15_hpsv21"], [f"data.dataset={missing}"])
    with pytest.raises(ConfigError, match=r"'imagerefl' needs data\.dataset"):
        load_config(["imagerefl_sd15_hpsv21"])
    # a hub dataset name is not a folder and is not looked up
    load_config(["imagerefl_sd15_hpsv21"], ["data.dataset=org/coco-captions"])
    load_config(["imagerefl_sd15_hpsv21"], ["data.dataset=hf:coco"])
    existing = tmp_path / "coco"
    existing.mkdir()
    load_config(["imagerefl_sd15_hpsv21"], [f"data.dataset={existing}"])


def test_unknown_reward(tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\.0\.name: unknown reward 'pickscor'; accepted: .*pickscore.*"
                                          r"\(did you mean 'pickscore'\?\)"):
        load_config([], ["rewards.0.name=pickscor"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"rewards\.0\.name is missing"):
        load_config([], ["rewards.0={weight = 1.0}"], check_inputs=False)
    with pytest.raises(ConfigError, match="no rewards configured"):
        load_config([], ["rewards=[]"], check_inputs=False)
    # a caller-supplied list of reward names replaces the default one
    c = load_config([], ["rewards.0.name=toy"], known_rewards=["toy"], check_inputs=False)
    assert c.rewards[0].name == "toy"
    with pytest.raises(ConfigError, match="unknown reward 'pickscore'; accepted: toy"):
        load_config([], [], known_rewards=["toy"], check_inputs=False)


def test_k_larger_than_step_count_and_refl_range():
    with pytest.raises(ConfigError, match=r"objective\.k = 30 is larger than objective\.num_steps = 25"):
        load_config([], ["objective.k=30"], check_inputs=False)
    assert load_config([], ["objective.k=25"], check_inputs=False).objective.k == 25
    assert load_config([], ["objective.k=all"], check_inputs=False).objective.k == "all"
    with pytest.raises(ConfigError, match=r"objective\.k must be >= 1"):
        load_config([], ["objective.k=0"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"refl_stop_range = \[30, 39\] must satisfy 0 <= first <= last < "
                                          r"objective\.num_steps = 25"):
        load_config([], ["run.objective=refl"], check_inputs=False)
    load_config([], ["run.objective=refl", "objective.num_steps=40"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"imagerefl_start_step = 35 must be in \[0, refl_stop_range\[0\] = 30\]"):
        load_config(["imagerefl_sd15_hpsv21"], ["objective.imagerefl_start_step=35"], check_inputs=False)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config([], ["optim.lr=-1", "lora.rank=0", "sampling.eta=2.0", "checkpoint.keep_last=0",
                         "objective.k=30"], check_inputs=False)
    text = str(info.value)
    assert text.startswith("5 configuration problems:")
    for part in ("optim.lr must be > 0", "lora.rank must be >= 1", "sampling.eta must be in [0, 1]",
                 "checkpoint.keep_last must be >= 1", "objective.k = 30 is larger than objective.num_steps"):
        assert part in text
    # a config built in code (as a user interface does) is checked the same way
    config = TrainConfig()
    config.optim.lr, config.objective.k = -1.0, 30
    with pytest.raises(ConfigError, match=r"2 configuration problems:\n  - optim\.lr must be > 0.*\n  - objective\.k = 30"
                                          r" is larger"):
        validate_config(config, check_inputs=False)
    config.optim.lr = "fast"
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected number, got str 'fast'$"):
        validate_config(config, check_inputs=False)


def test_regularizer_and_sampling_constraints():
    with pytest.raises(ConfigError, match=r"random_eta_range needs a sampler that takes an eta"):
        load_config([], ["regularizers.random_eta_range=[0.0, 1.0]", "sampling.scheduler=euler"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"sampling\.eta = 0\.5 needs a sampler that takes an eta"):
        load_config([], ["sampling.eta=0.5", "sampling.scheduler=dpmpp_2m"], check_inputs=False)
    for scheduler in ("auto", "ddim", "euler_a", "karras"):  # each trajectory takes an eta (DDIM / ancestral)
        load_config([], ["regularizers.random_eta_range=[0.0, 1.0]", f"sampling.scheduler={scheduler}"],
                    check_inputs=False)
    with pytest.raises(ConfigError, match=r"intermediate_weight .* applies to run\.objective = 'draft', not 'refl'"):
        load_config([], ["objective.intermediate_weight=1.0", "run.objective=refl"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"intermediate_weight needs an intermediate step"):
        load_config([], ["objective.intermediate_weight=1.0", "objective.num_steps=1"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"random_eta_range must be \[\] or \[low, high\]"):
        load_config([], ["regularizers.random_eta_range=[0.8, 0.2]"], check_inputs=False)
    with pytest.raises(ConfigError, match=r"optim\.ema_decay must be in \[0, 1\)"):
        load_config([], ["optim.ema_decay=1.0"], check_inputs=False)


# ------------------------------------------------------------------------------------------------ output, help


ODD = 'quote " backslash \\ tab\t newline\n unicode é 🙂 del \x7f bell \x07'


@pytest.mark.parametrize("name", PRESETS + ["odd"])
def test_to_toml_round_trips(tmp_path, name):
    if name == "odd":
        config = load_config([], check_inputs=False, validate=False)
        config.data.prompts = [ODD, ""]
        config.sampling.negative_prompt = ODD
        config.optim.lr = 1.2345678901234567e-7
        config.run.seed = -3
        config.rewards = []
    else:
        config = load_config([name], check_inputs=False)
    text = to_toml(config)
    assert tomllib.loads(text) == config_to_dict(config)  # independent parse of the written text
    path = _write(tmp_path, "resolved.toml", text)
    assert load_config([path], check_inputs=False, validate=False) == config
    assert load_config([path], check_inputs=False, validate=False).data.prompts == config.data.prompts
    assert config_hash(config) == config_hash(load_config([path], check_inputs=False, validate=False))


def test_config_hash_changes_with_values():
    a = load_config([], check_inputs=False)
    b = load_config([], ["optim.lr=1e-3"], check_inputs=False)
    assert len(config_hash(a)) == 64 and config_hash(a) != config_hash(b)


def test_help_lists_every_field_with_default_and_doc():
    text = format_help()
    specs = setting_specs()
    assert [s.key for s in specs] == all_keys() and len(specs) > 60
    for spec in specs:
        assert f"  {spec.key} = " in text, spec.key
        assert spec.help and spec.help in text, spec.key
    # a few literal lines, written out independently
    for line in ("  optim.lr = 0.00025    [number]", "  objective.k = 1    [integer or \"all\"]",
                 "  lora.target_modules = []    [list of strings]", "  sampling.scheduler = \"auto\"    [string]",
                 "  rewards.N.name = (required)    [string]", "  run.objective = \"draft\"    [string]",
                 "  sampling.cfg_scale = (unset)    [number]", "      peak AdamW learning rate; range > 0",
                 "      LoRA dropout probability; range in [0, 1)"):
        assert line in text
    assert "one of: draft, draft-lv, refl, imagerefl" in text
    assert "tiny_cpu" in text  # presets are listed


def test_help_presets_and_setting_specs_come_from_one_declaration():
    """The CLI's --help, a preset and setting_spec (what the ComfyUI node reads) agree on default and range."""
    from rdt_lib.rewards import available
    from rdt_lib.sampling import SCHEDULERS
    from rdt_lib.train.cli import build_parser
    from rdt_lib.train.config import setting_spec

    help_text = build_parser().format_help()
    preset = load_config(["draftplus_sd15_pickscore"], check_inputs=False)
    preset_file = tomllib.loads(preset_path("draftplus_sd15_pickscore").read_text())
    cases = {  # key: (type, default, ge, gt, le, lt), range text, a value outside; written out independently
        "optim.lr": ((float, 2.5e-4, None, 0, None, None), "> 0", 0),
        "optim.ema_decay": ((float, 0.0, 0, None, None, 1), "in [0, 1)", 1),
        "sampling.eta": ((float, 0.0, 0, None, 1, None), "in [0, 1]", 1.5),
        "lora.rank": ((int, 32, 1, None, None, None), ">= 1", 0),
        "optim.eps": ((float, 1e-8, None, 0, None, None), "> 0", -1e-8),
        "lora.dropout": ((float, 0.0, 0, None, None, 1), "in [0, 1)", -0.5),
        "checkpoint.keep_last": ((int, 3, 1, None, None, None), ">= 1", 0),
    }
    for key, (declared, rng, bad) in cases.items():
        spec = setting_spec(key)
        assert (spec.type, spec.default, spec.ge, spec.gt, spec.le, spec.lt) == declared, key
        assert f"  {key} = {spec.default!r}    [" in help_text, key
        assert f"{spec.help}; range {rng}" in help_text, key
        section, name = key.split(".")
        value = getattr(getattr(preset, section), name)
        if name not in preset_file.get(section, {}):
            assert value == spec.default, key  # a preset that leaves a key out gets the declared default
        ge, gt, le, lt = declared[2:]
        assert (ge is None or value >= ge) and (gt is None or value > gt), key
        assert (le is None or value <= le) and (lt is None or value < lt), key
        with pytest.raises(ConfigError, match=re.escape(f"{key} must be {rng}, got {bad}")):
            load_config(["draftplus_sd15_pickscore"], [f"{key}={bad}"], check_inputs=False)
    assert setting_spec("sampling.scheduler").choices == tuple(SCHEDULERS)
    assert setting_spec("rewards.0.name").choices == tuple(available())
    assert setting_spec("run.objective").choices == ("draft", "draft-lv", "refl", "imagerefl")
    assert setting_spec("lora.target_modules").default == []  # = the network's attention projections
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        setting_spec("optim.lrr")
