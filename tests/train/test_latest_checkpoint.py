"""`cxrfm train --resume` picks the latest checkpoint Ray Train committed, never a directory that was still
being written when a node or the driver died (it may lack some ranks' partitions)."""

from __future__ import annotations

import json

import pytest

from cxrfm.config import ConfigError
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


def test_without_a_snapshot_nothing_is_committed(tmp_path):
    """Ray Train writes the snapshot when it commits its first checkpoint: directories alone (rank 0 wrote
    its part, the other ranks had not reported when the node died) are never resumed from."""
    _ckpt(tmp_path, "checkpoint_a", 10)
    assert latest_checkpoint(tmp_path) == (None, -1)
    assert latest_checkpoint(tmp_path / "none") == (None, -1)


def test_a_half_written_snapshot_is_read_again_then_reported(tmp_path):
    import threading

    _ckpt(tmp_path, "checkpoint_a", 10)
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text('{"latest_checkpoint_result": {"checkpoint_dir')  # the controller is rewriting it
    whole = json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}})
    finisher = threading.Timer(0.25, snapshot.write_text, args=(whole,))
    finisher.start()
    try:
        assert latest_checkpoint(tmp_path, attempts=50) == (str(tmp_path / "checkpoint_a"), 10)
    finally:
        finisher.join()
    snapshot.write_text("{trunc")  # damaged for good: one clear error naming the file
    with pytest.raises(ConfigError, match="checkpoint_manager_snapshot.json stays unreadable"):
        latest_checkpoint(tmp_path, attempts=2)


def test_a_committed_checkpoint_whose_files_are_gone_is_an_error(tmp_path):
    (tmp_path / "checkpoint_a").mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}}))
    with pytest.raises(ConfigError, match="no DeepSpeed 'latest' file"):
        latest_checkpoint(tmp_path)
