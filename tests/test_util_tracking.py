"""--wandb (util/tracking.py): an offline W&B run written under --output_dir with the settings and the metrics, and
continued by the resumed run; without the package, one line naming the install."""
import glob
import os

import pytest

import main_pretrain
from helpers import TINY_PRETRAIN, run_entry


def _records(run_dir):
    """The bytes of an offline run's record file (W&B keeps the config and every logged row there)."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.e2e
def test_an_offline_wandb_run_has_the_settings_and_metrics_and_the_resumed_run_continues_it(image_folder, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = [*TINY_PRETRAIN, "--data_path", image_folder, "--output_dir", out, "--log_dir", "", "--wandb",
            "--wandb_mode", "offline", "--wandb_project", "mae-tests", "--blr", "0.00123"]
    proc = run_entry(main_pretrain, *args, "--epochs", "1")
    run_id = (out / "wandb_run_id").read_text().strip()
    assert f"Weights & Biases: run {run_id} of project mae-tests (new, offline mode" in proc.stdout
    (first,) = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))
    records = _records(first)
    assert b"mae-tests" in records and b"0.00123" in records and b"mae_vit_tiny_patch16" in records  # the config
    assert b"step/train_loss" in records and b"step/grad_norm" in records and b"train_loss" in records  # metrics
    proc = run_entry(main_pretrain, *args, "--epochs", "2")  # auto-resume: the same W&B run
    assert f"Weights & Biases: run {run_id} of project mae-tests (continued" in proc.stdout
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2


def test_wandb_without_the_package_names_the_install(image_folder, monkeypatch):
    import util.optional as optional

    real = optional.importlib.util.find_spec
    monkeypatch.setattr(optional.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", image_folder, "--epochs", "1", "--output_dir", "",
                     "--log_dir", "", "--wandb", check=False)
    assert proc.returncode == 2 and "pip install -r requirements-wandb.txt" in proc.stderr
