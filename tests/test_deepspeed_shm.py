"""parallel/deepspeed_shm.py: each rank unlinks its own DeepSpeed all-reduce segment, after the barrier."""

from __future__ import annotations

import os

from parallel import deepspeed_shm


def test_each_rank_unlinks_its_own_segment_after_every_rank_has_mapped_them(tmp_path, monkeypatch):
    monkeypatch.setattr(deepspeed_shm, "SHM_DIR", tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29612")
    uid = os.getuid()
    own, peer = (tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29612_{rank}" for rank in (1, 0))
    other_job = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29700_1"
    for path in (own, peer, other_job):
        path.write_bytes(b"x")
    events = []

    def barrier() -> None:
        events.append(("barrier", own.exists()))  # nothing is unlinked before every rank got here

    assert deepspeed_shm.release_allreduce_segment(1, barrier)
    assert events == [("barrier", True)]
    assert not own.exists() and peer.exists() and other_job.exists()  # only this rank's, only this job's
    assert not deepspeed_shm.release_allreduce_segment(1, barrier)  # none left (or the shm path was off)
    assert len(events) == 2  # the barrier is collective: every rank calls it either way
