"""``python -m rdt_lib.train``: help, config errors (exit status 2 with a clear message), a short run."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from rdt_lib.train.cli import main
from rdt_lib.train.config import all_keys
from train_fixtures import tiny_overrides


def _run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _args(tmp_path, *extra):
    argv = ["--config", "tiny_cpu"]
    for item in tiny_overrides(tmp_path / "out") + list(extra):
        argv += ["--set", item]
    return argv


def test_help_documents_every_key_with_default():
    proc = subprocess.run([sys.executable, "-m", "rdt_lib.train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for key in all_keys():
        assert key in proc.stdout, key
    assert "optim.lr = 0.00025" in proc.stdout and "--resume" in proc.stdout and "tiny_cpu" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rat=1e-4", "did you mean 'optim.lr'"),
    ("optim.lrr=1e-4", "did you mean 'optim.lr'"),
    ("optim.batch_size=\"two\"", "optim.batch_size: expected integer"),
    ("rewards.0.name=pickscor", "did you mean 'pickscore'"),
    ("objective.k=9", "larger than objective.num_steps"),
])
def test_config_errors_exit_2_with_message(tmp_path, capsys, override, message):
    code, _, err = _run(_args(tmp_path, override), capsys)
    assert code == 2
    assert message in err


def test_missing_dataset_folder_is_an_error(tmp_path, capsys):
    code, _, err = _run(_args(tmp_path, "run.objective=imagerefl", f"data.dataset={tmp_path / 'nope'}"), capsys)
    assert code == 2 and "does not exist" in err and "data.dataset" in err


def test_empty_dataset_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(_args(tmp_path, "run.objective=imagerefl", f"data.dataset={tmp_path / 'empty'}"), capsys)
    assert code == 2 and "has no images" in err


def test_print_config_and_short_run(tmp_path, capsys):
    code, out, _ = _run(_args(tmp_path, "run.max_steps=1") + ["--print-config"], capsys)
    assert code == 0 and "max_steps = 1" in out
    code, out, err = _run(_args(tmp_path, "run.max_steps=1", "run.objective=refl"), capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    assert (tmp_path / "out" / "lora.toml").is_file()


def test_imagerefl_from_image_folder(tmp_path, capsys):
    from train_fixtures import write_image_folder

    folder = write_image_folder(tmp_path / "imgs")
    code, _, err = _run(_args(tmp_path, "run.max_steps=1", "run.objective=imagerefl", f"data.dataset={folder}"),
                        capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "lora.safetensors").is_file()
