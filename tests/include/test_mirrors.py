"""The mirror changes a rollout records in the run folder, as the hourly audit reads them."""

from __future__ import annotations

import logging

from vision_rollout.folders import Folder
from vision_rollout.mirrors import MirrorLog, mirror_log


def test_the_shares_are_the_change_in_force_at_each_sample_and_none_before_the_first(tmp_path):
    t = 1_800_000_000.0
    clock = iter([t + 90, t + 200, t + 5000])
    mirrors = MirrorLog(Folder(str(tmp_path)) / "mirrors" / "digits", "digits", clock=lambda: next(clock))
    assert mirrors.shares(t, t + 600, 60) is None  # (nothing recorded: not known)
    mirrors.record("2", 10)
    mirrors.record("2", 0)
    mirrors.record("3", 50)  # (after the range)
    assert mirrors.shares(t, t + 300, 60) == [(t + 120, 10.0), (t + 180, 10.0), (t + 240, 0.0), (t + 300, 0.0)]
    last = mirrors.last()
    assert last is not None
    assert (last.version, last.percent) == ("3", 50.0)
    later = mirrors.shares(t + 6000, t + 6120, 60)
    assert later == [(t + 6000, 50.0), (t + 6060, 50.0), (t + 6120, 50.0)]  # (the change in force at its start)


def test_prune_keeps_the_change_in_force_and_a_record_not_the_rollouts_is_a_warning(tmp_path, caplog):
    t = 1_800_000_000.0
    clock = iter([t, t + 10, t + 20, t + 100])
    mirrors = MirrorLog(Folder(str(tmp_path)) / "mirrors" / "digits", "digits", clock=lambda: next(clock))
    for percent in (5, 10, 0, 20):
        mirrors.record("2", percent)
    assert len(mirrors.prune(t + 50, limit=500)) == 2
    assert mirrors.shares(t + 60, t + 120, 60) == [(t + 60, 0.0), (t + 120, 20.0)]  # (0% was in force)
    folder = tmp_path / "mirrors" / "digits"
    (folder / sorted(p.name for p in folder.iterdir())[-1]).write_text('{"percent": "lots"}')
    with caplog.at_level(logging.WARNING):
        assert mirrors.shares(t + 60, t + 120, 60) == [(t + 60, 0.0), (t + 120, 0.0)]
    assert "is not one the rollout wrote" in caplog.text
    # Nested past the parser's recursion limit (within the record's 4096 bytes): a warning too,
    # not a RecursionError out of every read of the mirror's history.
    (folder / sorted(p.name for p in folder.iterdir())[-1]).write_text("[" * 4000)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert mirrors.last() is None
    assert "is not one the rollout wrote" in caplog.text


def test_a_models_mirror_log_is_its_own_below_the_run_folder(tmp_path):
    assert mirror_log(Folder(str(tmp_path)), "digits").folder.path == tmp_path / "mirrors" / "digits"


def test_a_mirror_observed_in_the_routes_is_recorded_only_when_it_is_new_and_no_rollout_just_wrote(tmp_path):
    t = 1_800_000_000.0
    now = [t]
    mirrors = MirrorLog(Folder(str(tmp_path)) / "mirrors" / "digits", "digits", clock=lambda: now[0])
    assert mirrors.observe(None, 0) is None  # (nothing mirrored, nothing recorded)
    mirrors.record("2", 10)
    now[0] += 60
    assert mirrors.observe("2", 50) is None  # (a rollout's record a minute old: its routes may not be written yet)
    now[0] += 600
    assert mirrors.observe("2", 10) is None  # (as recorded)
    changed = mirrors.observe("2", 50)
    assert changed is not None
    assert (changed.at, changed.version, changed.percent) == (t + 660, "2", 50.0)


def test_a_guard_file_a_killed_removal_left_among_the_changes_is_pruned(tmp_path):
    """A removal on a disk locks ``.<name>.lock`` beside the file and removes it once done: a
    prune killed after removing a change, before removing its guard, left the guard for good
    (nothing else removes files there). Once older than the prune's time, it goes too."""
    import os

    t = 1_800_000_000.0
    clock = iter([t, t + 10])
    mirrors = MirrorLog(Folder(str(tmp_path)) / "mirrors" / "digits", "digits", clock=lambda: next(clock))
    mirrors.record("2", 5)
    mirrors.record("2", 0)
    folder = tmp_path / "mirrors" / "digits"
    gone = folder / ".20270115T074000.000000Z.json.lock"  # (an older change's: a prune killed under its lock)
    foreign = folder / ".notes.txt.lock"  # (not a change's: left alone)
    for guard in (gone, foreign):
        guard.write_bytes(b"")
        os.utime(guard, (t, t))
    assert len(mirrors.prune(t + 50, limit=500, dry_run=True)) == 1
    assert gone.exists()
    assert len(mirrors.prune(t + 50, limit=500)) == 1
    assert not gone.exists()
    assert foreign.exists()
