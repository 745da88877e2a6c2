"""The pure policies, tested without torch or storage: tables of cases and Hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_callback import CheckpointInfo, InvalidArgumentError, RetentionPolicy, SavePolicy


def ck(step: int, kind: str = "automatic", loss: float | None = None, **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(name=f"c{step}-{kind}", step=step, type=kind, eval_loss=loss, metrics=metrics,
                          created_at=f"2025-01-01T00:00:{step % 60:02d}.{step:06d}Z")


@pytest.mark.parametrize(
    ("every", "step", "last", "expected"),
    [(100, 100, None, True), (100, 150, 100, False), (100, 200, 100, True), (100, 100, 100, False),
     (None, 100, None, False), (1, 7, 6, True)],
)
def test_save_every_n_steps(every, step, last, expected):
    assert SavePolicy(every_n_steps=every).should_save(step, last_step=last, last_time=0, now=0) is expected


def test_save_every_n_seconds():
    policy = SavePolicy(every_n_seconds=60)
    assert not policy.should_save(5, last_step=4, last_time=100, now=150)
    assert policy.should_save(5, last_step=4, last_time=100, now=160)


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"every_n_steps": -5}, {"every_n_seconds": 0}])
def test_bad_save_policy(kwargs):
    with pytest.raises(InvalidArgumentError):
        SavePolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "infos", "deleted"),
    [
        # keep the 2 newest automatic ones
        ({"keep_last": 2}, [ck(1), ck(2), ck(3), ck(4)], ["c1-automatic", "c2-automatic"]),
        # the best by eval loss survives though old
        ({"keep_last": 1}, [ck(1, loss=0.1), ck(2, loss=0.5), ck(3, loss=0.4)], ["c2-automatic"]),
        # mode max
        ({"keep_last": 1, "mode": "max", "monitor": "acc"}, [ck(1, acc=0.9), ck(2, acc=0.5), ck(3, acc=0.4)],
         ["c2-automatic"]),
        # final and manual are never deleted
        ({"keep_last": 0}, [ck(1, "manual"), ck(2), ck(3, "final")], ["c2-automatic"]),
        # the newest is kept even with keep_last=0
        ({"keep_last": 0, "keep_best": 0}, [ck(1), ck(2)], ["c1-automatic"]),
        # keep_last=None keeps everything
        ({"keep_last": None}, [ck(1), ck(2), ck(3)], []),
        # keep_best=2
        ({"keep_last": 1, "keep_best": 2}, [ck(1, loss=0.1), ck(2, loss=0.2), ck(3, loss=0.9), ck(4, loss=0.8)],
         ["c3-automatic"]),
    ],
)
def test_to_delete(kwargs, infos, deleted):
    assert [i.name for i in RetentionPolicy(**kwargs).to_delete(infos)] == deleted


def test_protected_resume_point_is_kept():
    infos = [ck(1), ck(2), ck(3)]
    assert [i.name for i in RetentionPolicy(keep_last=1, keep_best=0).to_delete(infos, protect=["c1-automatic"])] == [
        "c2-automatic"]


def test_retag_moves_best_and_keeps_final_and_manual_tags():
    policy = RetentionPolicy()
    infos = [ck(1, "best", loss=0.5), ck(2, loss=0.3), ck(3, "manual", loss=0.9)]
    assert policy.retag(infos) == {"c1-best": "automatic", "c2-automatic": "best"}
    assert policy.retag([ck(1, "best", loss=0.5), ck(2, "final", loss=0.1)]) == {"c1-best": "automatic"}


def test_best_ignores_checkpoints_without_the_metric():
    policy = RetentionPolicy(monitor="accuracy", mode="max")
    assert policy.best([ck(1, loss=0.1), ck(2)]) is None
    assert policy.best([ck(1, eval_accuracy=0.7), ck(2, accuracy=0.6)]).step == 1


@pytest.mark.parametrize("kwargs", [{"keep_last": -1}, {"keep_best": -1}, {"mode": "lowest"}, {"monitor": ""}])
def test_bad_retention(kwargs):
    with pytest.raises(InvalidArgumentError):
        RetentionPolicy(**kwargs)


checkpoints = st.lists(
    st.tuples(st.integers(0, 1000), st.sampled_from(["automatic", "best", "manual", "final"]),
              st.none() | st.floats(0, 10, allow_nan=False)),
    max_size=30, unique_by=lambda t: t[0],
).map(lambda rows: [ck(step, kind, loss) for step, kind, loss in rows])


@settings(max_examples=300)
@given(infos=checkpoints, keep_last=st.integers(0, 5), keep_best=st.integers(0, 3),
       mode=st.sampled_from(["min", "max"]), protect=st.integers(0, 29))
def test_retention_properties(infos, keep_last, keep_best, mode, protect):
    policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, mode=mode)
    protected = [infos[protect].name] if protect < len(infos) else []
    doomed = {i.name for i in policy.to_delete(infos, protect=protected)}
    kept = [i for i in infos if i.name not in doomed]
    best = policy.best(infos)
    newest = max(infos, key=lambda i: (i.step, i.created_at), default=None)
    # never deletes the final, a manual one, the newest or the protected one
    assert not any(i.type in ("final", "manual") for i in infos if i.name in doomed)
    assert newest is None or newest.name not in doomed
    assert not set(protected) & doomed
    # never deletes the current best while keep_best > 0
    if keep_best and best is not None:
        assert best.name not in doomed
    # never more than keep_last automatic ones beyond the protected ones (best, newest, resume point)
    extra = {*(i.name for i in policy.ranked(infos)[:keep_best]), newest.name if newest else None, *protected,
             *(i.name for i in infos if i.type == "best" and keep_best)}
    scheduled = [i for i in kept if i.type in ("automatic", "best") and i.name not in extra]
    assert len(scheduled) <= keep_last
    # retagging after the prune leaves at most one best tag, on the best
    tags = policy.retag(kept)
    after = [tags.get(i.name, i.type) for i in kept]
    assert after.count("best") <= 1


def test_prune_with_another_monitor_keeps_the_runs_best_tag():
    # tagged best by a run that monitored accuracy; pruned by hand with the default monitor
    infos = [ck(1, "best", loss=0.9, accuracy=0.99), ck(2, loss=0.5), ck(3, loss=0.4), ck(4, loss=0.6)]
    doomed = [i.name for i in RetentionPolicy(keep_last=1).to_delete(infos)]
    assert "c1-best" not in doomed and doomed == ["c2-automatic"]
