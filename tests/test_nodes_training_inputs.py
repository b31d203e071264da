"""RDTTrainRewardLoRA's inputs without ComfyUI: declarations taken from the trainer's settings, the config a node
run builds, and every bad input refused before any model is touched, with a message naming what to change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from comfy_rdt_nodes import NODE_CLASS_MAPPINGS
from comfy_rdt_nodes import nodes_training as nt
from rdt_lib.train.config import setting_spec


class SD15:  # stands in for comfy.supported_models.SD15 (the node reads the class name)
    pass


class Flux:
    pass


def fake_model(config_cls=SD15):
    return SimpleNamespace(model=SimpleNamespace(model_config=config_cls(), diffusion_model=torch.nn.Linear(1, 1)))


def fake_reward(name="pickscore"):
    return SimpleNamespace(name=name, reward=torch.nn.Linear(1, 1), patcher=None)


def inputs(**over):
    base = dict(model=fake_model(), clip=object(), vae=object(), reward_model=fake_reward(), reward_weight=1.0,
                prompts="a cat\na dog", objective="draft", steps=3, learning_rate=1e-3, lora_rank=4, lora_alpha=4.0,
                k=1, sampling_steps=4, batch_size=1, grad_accumulation=1, kl_coeff=0.0, l2_init_coeff=0.0,
                random_eta=False, seed=0, resolution=64, lora_name="my_lora", if_exists="refuse")
    base.update(over)
    return base


@pytest.fixture
def folders(tmp_path, monkeypatch):
    loras, out = tmp_path / "loras", tmp_path / "output"
    loras.mkdir()
    monkeypatch.setattr(nt, "lora_paths", lambda name: (loras / f"{name}.safetensors", out / "rdt_training" / name))
    return SimpleNamespace(loras=loras, out=out)


def run(**over):
    return nt.RDTTrainRewardLoRA().plan(**inputs(**over))


def test_registered_with_category_and_outputs():
    cls = NODE_CLASS_MAPPINGS["RDTTrainRewardLoRA"]
    assert cls.CATEGORY == "rdt/training"
    assert cls.RETURN_TYPES == ("MODEL", "STRING", "IMAGE")


@pytest.mark.parametrize("name,key", sorted(nt.INPUT_KEYS.items()))
def test_widget_ranges_come_from_the_trainer_settings(name, key):
    decl = nt.RDTTrainRewardLoRA.INPUT_TYPES()
    kind, opts = {**decl["required"], **decl["optional"]}[name]
    spec = setting_spec(key)
    assert spec.help in opts["tooltip"]
    if spec.choices:
        assert list(spec.choices) == kind
        return
    lo = spec.ge if spec.ge is not None else spec.gt
    if lo is not None:
        assert opts["min"] == lo
    hi = spec.le if spec.le is not None else spec.lt
    if hi is not None:
        assert opts["max"] == hi
    if name not in nt.NODE_DEFAULTS:
        assert opts["default"] == (spec.default if spec.default is not None else opts["default"])


def test_node_config_maps_inputs_onto_the_trainer_config():
    rewards = nt.collect_rewards(fake_reward("pickscore"), 2.0, {"reward_model_2": fake_reward("pickscore"),
                                                                  "reward_weight_2": 0.5})
    assert [r.label for r in rewards] == ["pickscore", "pickscore#1"]  # the headless trainer's labels
    c = nt.node_config(objective="draft", prompts=["a", "b"], steps=7, learning_rate=1e-3, lora_rank=4, lora_alpha=2.0,
                       k=2, sampling_steps=5, batch_size=3, grad_accumulation=2, kl_coeff=0.5, l2_init_coeff=0.1,
                       random_eta=True, seed=11, resolution=64, cfg=3.0, checkpoint_every=2,
                       gradient_checkpointing=True, rewards=rewards, name="sub/x", output_dir="/tmp/o",
                       base_name="ckpt.safetensors", resume=True)
    assert (c.run.max_steps, c.run.seed, c.run.output_name, c.run.resume) == (7, 11, "x", "latest")
    assert (c.lora.rank, c.lora.alpha, c.objective.k, c.objective.num_steps) == (4, 2.0, 2, 5)
    assert (c.optim.batch_size, c.optim.grad_accum, c.optim.lr, c.optim.gradient_checkpointing) == (3, 2, 1e-3, True)
    assert (c.regularizers.kl_coeff, c.regularizers.l2_init_coeff) == (0.5, 0.1)
    assert c.regularizers.random_eta_range == [0.0, 1.0]
    assert [(r.name, r.weight) for r in c.rewards] == [("pickscore", 2.0), ("pickscore", 0.5)]
    assert (c.model.path, c.model.resolution, c.sampling.cfg_scale, c.checkpoint.every) == ("ckpt.safetensors", 64,
                                                                                             3.0, 2)
    assert c.validation.every == 0 and not c.logging.tensorboard


def test_valid_inputs_make_a_plan(folders):
    plan = run()
    assert plan.config.data.prompts == ["a cat", "a dog"]
    assert plan.lora_path == folders.loras / "my_lora.safetensors"
    assert plan.config.run.output_dir == str(folders.out / "rdt_training" / "my_lora")


@pytest.mark.parametrize("over,match", [
    (dict(prompts="  \n# only a comment\n"), "no prompts"),
    (dict(reward_model=None), "no reward model"),
    (dict(model=fake_model(Flux)), r"supports SD1\.5 and SDXL.*SD15, SDXL.*Flux"),
    (dict(resolution=100), "multiple of 8"),
    (dict(k=5, sampling_steps=4), r"K = 5 is larger than sampling_steps = 4"),
    (dict(objective="imagerefl"), "needs real images"),
    (dict(objective="imagerefl", images=torch.zeros(3, 8, 8, 3), captions="a\nb"), "2 lines for 3 images"),
    (dict(lora_name="../escape"), "not a usable file name"),
    (dict(learning_rate=0.0), r"learning_rate \(optim\.lr\)"),
    (dict(reward_model=fake_reward("nosuchreward")), "unknown reward"),
    (dict(if_exists="maybe"), "if_exists must be one of"),
])
def test_bad_inputs_are_refused_before_training(folders, over, match):
    with pytest.raises(ValueError, match=match):
        run(**over)


def test_existing_file_needs_resume_or_overwrite(folders):
    (folders.loras / "my_lora.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="exists already.*resume.*overwrite"):
        run()
    with pytest.raises(ValueError, match="no checkpoint"):
        run(if_exists="resume")
    ckpt = folders.out / "rdt_training" / "my_lora" / "checkpoint-000002"
    ckpt.mkdir(parents=True)
    assert run(if_exists="resume").config.run.resume == "latest"
    assert run(if_exists="overwrite").config.run.resume == ""
    assert not ckpt.exists()  # overwrite starts from scratch


def test_memory_error_names_the_settings_to_lower():
    msg = nt.memory_error_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), batch_size=4,
                                  resolution=1024, k=3, gradient_checkpointing=False)
    for word in ("batch_size (now 4)", "resolution (now 1024)", "K (now 3", "gradient_checkpointing"):
        assert word in msg
    assert "gradient_checkpointing" not in nt.memory_error_message(RuntimeError("x"), batch_size=1, resolution=0,
                                                                   k=1, gradient_checkpointing=True)


def test_prompt_parsing_and_names():
    assert nt.parse_prompts(" a \n\n#x\nb\n") == ["a", "b"]
    assert nt.lora_file_name("dir/name.safetensors") == "dir/name"
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            nt.lora_file_name(bad)


def test_base_checkpoint_name_follows_the_model_links():
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0]}},
             "3": {"class_type": "RDTTrainRewardLoRA", "inputs": {"model": ["2", 0]}}}
    assert nt.base_checkpoint_name(graph, "3") == "base.safetensors"
    assert nt.base_checkpoint_name(None, "3") == "unknown"


def test_plot_is_an_image_batch():
    img = nt.plot_history([{"step": 1, "reward": 0.1, "loss": -0.1}, {"step": 2, "reward": 0.3, "loss": -0.3}], "t")
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3
    assert 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0
