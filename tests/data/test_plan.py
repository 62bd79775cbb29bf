"""The epoch plan on synthetic indexes, without Ray (issue 15): disjoint reads, equal ranks, spread, elastic."""

from __future__ import annotations

import numpy as np
import pytest

from mama_ray.data import plan

MBS = 8


def make_index(n_studies: int, per_group: int = 16, per_file: int = 80, seed: int = 0) -> plan.SplitIndex:
    """``n_studies`` training studies with 1–6 usable images, ``per_group`` studies per row group."""
    return plan.SplitIndex.laid_out(np.random.default_rng(seed).integers(1, 7, n_studies), per_group, per_file)


def params(world: int, epoch: int = 0, window: int = 128) -> plan.PlanParams:
    return plan.PlanParams(seed=3, epoch=epoch, micro_batch=MBS, global_batch=MBS * world, window=window)


def streams(index, world, **kw) -> list[np.ndarray]:
    ranks, _ = plan.epoch_plan(index, params(world), world, **kw)
    return [np.concatenate([w.samples for w in windows]) for windows in ranks]


@pytest.fixture(scope="module")
def index() -> plan.SplitIndex:
    return make_index(1200)  # ≈ 4200 images, 75 row groups


def test_flat_index_numbers_images_study_by_study():
    index = plan.SplitIndex(files=("a", "b"), study_ids=(("s0", "s1"), ("t0",)),
                            counts=(np.array([2, 0]), np.array([3])), rows=(np.array([0, 2]), np.array([1])),
                            row_groups=((2, 1), (1, 1)))
    flat = index.flat
    assert flat.sample_study.tolist() == [0, 0, 2, 2, 2] and flat.sample_slot.tolist() == [0, 1, 0, 1, 2]
    # s0 is row 0 of a's group 0, s1 row 0 of a's group 1, t0 row 0 of b's group 1
    assert flat.study_row.tolist() == [0, 0, 0]
    assert [(int(flat.unit_file[u]), int(flat.unit_group[u])) for u in flat.study_unit] == [(0, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ranks_read_disjoint_row_groups_and_take_equal_whole_batches(index, world):
    flat = index.flat
    ours = streams(index, world)
    units = [set(flat.sample_unit[s].tolist()) for s in ours]
    assert sum(len(u) for u in units) <= 1.05 * len(set().union(*units))  # read amplification
    every = np.concatenate(ours)
    assert len(every) == len(set(every.tolist()))  # no image twice
    assert len({len(s) for s in ours}) == 1 and len(ours[0]) % MBS == 0
    assert index.num_samples - len(every) <= max(world * MBS, index.num_samples // 100)


def test_a_studys_images_are_at_least_a_micro_batch_apart(index):
    study = index.flat.sample_study
    for s in streams(index, 4):
        last: dict[int, int] = {}
        for t, st in enumerate(study[s].tolist()):
            assert t - last.get(st, -MBS) >= MBS
            last[st] = t


def test_plan_is_deterministic_and_changes_by_epoch(index):
    a, _ = plan.epoch_plan(index, params(2), 2)
    b, _ = plan.epoch_plan(index, params(2), 2)
    c, _ = plan.epoch_plan(index, params(2, epoch=1), 2)
    order = [np.concatenate([w.samples for w in windows]) for windows in (a[0], b[0], c[0])]
    assert np.array_equal(order[0], order[1]) and not np.array_equal(order[0], order[2])


def test_spread_keeps_studies_apart_where_the_window_allows():
    study = np.repeat(np.arange(6), 4)  # 6 studies × 4 images, gap 5: feasible
    order = plan.spread(study, np.random.default_rng(0), gap=5)
    assert sorted(order.tolist()) == list(range(24))
    pos = {int(i): t for t, i in enumerate(order)}
    for s in range(6):
        t = sorted(pos[i] for i in np.flatnonzero(study == s))
        assert min(np.diff(t)) >= 5


def test_top_up_and_equalise_give_every_rank_the_same_length():
    sizes = np.array([10, 10, 6, 3])
    dealt = [[0, 3], [1], [2]]  # loads 13, 10, 6; length 9 → rank 2 is short by 3
    topped = plan.top_up(dealt, sizes, 9)
    # the best single move or swap: unit 3 (3 samples) from rank 0 to rank 2 → 10, 10, 9
    assert topped == [[0], [1], [2, 3]]
    ids = [np.arange(10), np.arange(10, 20), np.arange(20, 26), np.arange(26, 29)]
    pieces = plan.equalise([[(u, ids[u]) for u in mine] for mine in topped], 9)
    assert [sum(len(i) for _, i in mine) for mine in pieces] == [9, 9, 9]
    # each rank keeps the head of its own units; nothing moved between ranks, 1 + 1 samples dropped
    assert [[(u, i.tolist()) for u, i in mine] for mine in pieces] == [
        [(0, list(range(9)))], [(1, list(range(10, 19)))], [(2, list(range(20, 26))), (3, [26, 27, 28])]]
    short = plan.equalise([[(0, ids[0])], [(1, ids[1])], [(2, ids[2])]], 8)  # rank 2 short by 2
    assert [(u, i.tolist()) for u, i in short[2]] == [(2, list(range(20, 26))), (0, [8, 9])]


def test_common_length_drops_at_most_one_global_batch_or_one_percent():
    p = plan.PlanParams(0, 0, micro_batch=4, global_batch=8, window=16)
    assert plan.common_length([20, 21], p) == 20  # the shortest rank, in whole micro-batches: drops 1
    assert plan.common_length([30, 10], p) == 16  # 10 would drop 20 > 8: fill up to 16 (drops 8)
    with pytest.raises(ValueError, match="less than one micro-batch"):
        plan.common_length([3, 2], p)


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2), (3, 2)])
def test_elastic_history_plans_exactly_what_is_left(index, before, after):
    first = streams(index, before)
    consumed = 5 * MBS
    done = np.concatenate([s[:consumed] for s in first])
    rest = streams(index, after, history=((before, consumed, MBS, 1),))
    left = np.concatenate(rest)
    assert not set(done.tolist()) & set(left.tolist())  # nothing repeated
    assert len({len(s) for s in rest}) == 1
    # everything not consumed comes back but at most one global batch at the new size (or 1 %)
    assert index.num_samples - len(done) - len(left) <= max(after * MBS, (index.num_samples - len(done)) // 100)
    _, offset = plan.epoch_plan(index, params(after), after, history=((before, consumed, MBS, 1),))
    assert offset == before * consumed


def test_history_that_does_not_fit_the_plan_is_refused(index):
    with pytest.raises(ValueError, match="consumed"):
        plan.epoch_plan(index, params(2), 2, history=((4, 10**6, MBS, 1),))
