"""Checkpoint settings refused before launch, and how complete checkpoints are found (no processes)."""

import json

import pytest

import orchestrator.cli.train as train_app
from orchestrator.runs import checkpoint
from orchestrator.validate import ConfigError
from tests.conftest import make_cfg


def fake_checkpoint(root, step, model=None, complete=True):
    """A folder shaped like a checkpoint (the DCP files are empty: only discovery is exercised)."""
    path = root / (f"step-{step}" if complete else f"step-{step}.tmp")
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    if complete:
        (path / checkpoint.MARKER).write_text(json.dumps({"step": step, "config": {"model": model or {}}}))
    return path


def test_newest_complete_checkpoint_is_found_and_partial_ones_never(tmp_path):
    for step in (2, 10, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "step-14").mkdir()  # renamed but without a marker: not ours, not complete
    assert [p.name for p in checkpoint.complete_checkpoints(str(tmp_path))] == ["step-2", "step-4", "step-10"]
    assert checkpoint.find_resume("auto", str(tmp_path)).name == "step-10"
    assert checkpoint.find_resume("never", str(tmp_path)) is None
    assert checkpoint.find_resume(str(tmp_path / "step-4"), "/unused").name == "step-4"
    assert checkpoint.find_resume("auto", str(tmp_path / "absent")) is None


def run_refused(cfg, tmp_path, monkeypatch) -> str:
    spawned = []
    monkeypatch.setattr(train_app, "spawn", lambda *a, **k: spawned.append(a))
    with pytest.raises(ConfigError) as e:
        train_app.run(cfg, str(tmp_path / "run"))
    assert spawned == []
    return str(e.value)


def test_resume_from_a_dir_without_a_complete_checkpoint_is_refused(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "ck", 3, complete=False)
    msg = run_refused(make_cfg(f"checkpoint.resume={tmp_path / 'ck'}", tmp=tmp_path), tmp_path, monkeypatch)
    assert "holds no complete checkpoint" in msg


def test_resume_from_a_missing_path_is_refused(tmp_path, monkeypatch):
    msg = run_refused(make_cfg("checkpoint.resume=/no/such/ckpt", tmp=tmp_path), tmp_path, monkeypatch)
    assert "checkpoint.resume='/no/such/ckpt' does not exist" in msg and "auto, never" in msg


def test_a_checkpoint_of_another_model_size_is_refused_in_one_line(tmp_path, monkeypatch):
    cfg = make_cfg(tmp=tmp_path)
    saved = {**dict(cfg.model), "dim": 64, "name": "bigger"}
    fake_checkpoint(tmp_path / "checkpoints", 5, model=saved)
    msg = run_refused(cfg, tmp_path, monkeypatch)
    assert "holds a different model (bigger): dim=64 there, 32 here" in msg and "\n" not in msg


def test_an_unwritable_checkpoint_dir_is_refused(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    msg = run_refused(make_cfg(f"checkpoint.dir={blocker}/ckpt", tmp=tmp_path), tmp_path, monkeypatch)
    assert f"checkpoint.dir='{blocker}/ckpt' is not writable" in msg


def test_auto_with_only_partial_checkpoints_warns_and_starts_fresh(tmp_path, monkeypatch, capsys):
    fake_checkpoint(tmp_path / "checkpoints", 7, complete=False)
    spawned = []
    monkeypatch.setattr(train_app, "spawn", lambda *a, **k: spawned.append(a))
    train_app.run(make_cfg(tmp=tmp_path), str(tmp_path / "run"))
    assert len(spawned) == 1 and spawned[0][5] is None  # resume=None: a fresh start
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_init_from_a_folder_that_is_not_a_hf_llama_is_refused(tmp_path, monkeypatch):
    msg = run_refused(make_cfg(f"model.init_from={tmp_path}", tmp=tmp_path), tmp_path, monkeypatch)
    assert "is not a Hugging Face Llama folder" in msg


def test_init_from_a_hf_model_of_another_shape_is_refused(tmp_path, monkeypatch):
    from models.hf import hf_config, write_safetensors
    from models.llama import ModelArgs

    args = ModelArgs.from_config(make_cfg("model.n_layers=3").model)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args, __import__("torch").float32)))
    write_safetensors(tmp_path / "model.safetensors", {})
    msg = run_refused(make_cfg(f"model.init_from={tmp_path}", tmp=tmp_path), tmp_path, monkeypatch)
    assert "holds a different model: n_layers=3 there, 2 here" in msg
