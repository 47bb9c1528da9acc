"""`cxrfm train --resume` picks the latest checkpoint Ray Train committed, never a directory that was still
being written when a node or the driver died (it may lack some ranks' partitions)."""

from __future__ import annotations

import json

from cxrfm.train.trainer import latest_checkpoint


def _ckpt(storage, name: str, step: int) -> None:
    (storage / name).mkdir(parents=True)
    (storage / name / "latest").write_text(f"step{step}")


def test_the_committed_checkpoint_wins_over_a_newer_uncommitted_directory(tmp_path):
    _ckpt(tmp_path, "checkpoint_a", 10)
    _ckpt(tmp_path, "checkpoint_b", 20)  # written, but the driver died before every rank reported it
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 10}}}))
    assert latest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_a"), 10)


def test_without_a_snapshot_the_highest_step(tmp_path):
    _ckpt(tmp_path, "checkpoint_a", 10)
    _ckpt(tmp_path, "checkpoint_b", 20)
    assert latest_checkpoint(tmp_path) == (str(tmp_path / "checkpoint_b"), 20)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{trunc")  # being rewritten
    assert latest_checkpoint(tmp_path)[1] == 20
    assert latest_checkpoint(tmp_path / "none") == (None, -1)
