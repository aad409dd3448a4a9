import numpy as np
import pytest

from dlkit.data.split import allocate, part_sizes, stratified_split, stratified_subset

# an imbalanced label vector: 7 classes, 4..180 examples each
COUNTS = [180, 97, 55, 31, 12, 5, 4]
Y = np.repeat(np.arange(len(COUNTS)), COUNTS)
np.random.default_rng(123).shuffle(Y)
FRACTIONS = (0.7, 0.1, 0.2)


def test_part_sizes_are_largest_remainder_roundings():
    assert part_sizes(1797, (0.7, 0.1, 0.2)) == [1258, 180, 359]
    assert part_sizes(10, (0.5, 0.5)) == [5, 5]
    assert part_sizes(3, (0.5, 0.5)) == [2, 1]
    assert part_sizes(569, (0.8, 0.0, 0.2)) == [455, 0, 114]
    with pytest.raises(ValueError, match="sum to 1"):
        part_sizes(10, (0.5, 0.4))


def test_same_seed_same_split_and_another_seed_another():
    a = stratified_split(Y, FRACTIONS, seed=0)
    b = stratified_split(Y, FRACTIONS, seed=0)
    c = stratified_split(Y, FRACTIONS, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    # the class make-up is fixed by the counts, only the members change
    assert [np.bincount(Y[p], minlength=7).tolist() for p in a] == [
        np.bincount(Y[p], minlength=7).tolist() for p in c
    ]


def test_parts_are_disjoint_cover_everything_and_have_the_rounded_sizes():
    parts = stratified_split(Y, FRACTIONS, seed=5)
    assert [len(p) for p in parts] == part_sizes(len(Y), FRACTIONS)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(Y)
    assert np.array_equal(np.sort(joined), np.arange(len(Y)))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_each_class_keeps_its_share_within_one_example():
    parts = stratified_split(Y, FRACTIONS, seed=2)
    sizes = np.array([len(p) for p in parts])
    for c, n_c in enumerate(COUNTS):
        got = np.array([np.sum(Y[p] == c) for p in parts])
        expected = n_c * sizes / len(Y)
        assert np.all(np.abs(got - expected) <= 1.0), (c, got, expected)
        assert np.all(got >= 1)  # even the 4-example class reaches every part


def test_tiny_classes_are_represented_when_they_can_be():
    y = np.array([0] * 100 + [1] * 100 + [2] * 3)
    parts = stratified_split(y, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [163, 20, 20]
    for p in parts:
        assert set(y[p].tolist()) == {0, 1, 2}
    # two examples cannot fill three parts: no error, just absent somewhere
    y2 = np.array([0] * 50 + [1] * 2)
    parts2 = stratified_split(y2, (0.6, 0.2, 0.2), seed=0)
    assert sum(np.sum(y2[p] == 1) for p in parts2) == 2


def test_empty_part_when_its_fraction_is_zero():
    parts = stratified_split(Y, (0.8, 0.0, 0.2), seed=0)
    assert len(parts[1]) == 0
    assert len(parts[0]) + len(parts[2]) == len(Y)


def test_string_labels_are_stratified_too():
    y = np.array(["cat"] * 30 + ["dog"] * 10)
    train, test = stratified_split(y, (0.75, 0.25), seed=3)
    assert sorted(y[test].tolist()) == ["cat"] * 7 + ["dog"] * 3 or sorted(y[test].tolist()) == [
        "cat"
    ] * 8 + ["dog"] * 2
    assert len(test) == 10


def test_stratified_subset_keeps_proportions_and_is_seeded():
    sub = stratified_subset(Y, 100, seed=0)
    assert len(sub) == 100 and len(np.unique(sub)) == 100
    got = np.bincount(Y[sub], minlength=7)
    assert np.all(np.abs(got - np.array(COUNTS) * 100 / len(Y)) <= 1.0)
    assert np.array_equal(sub, stratified_subset(Y, 100, seed=0))
    assert not np.array_equal(sub, stratified_subset(Y, 100, seed=9))
    assert np.array_equal(stratified_subset(Y, 10_000, seed=0), np.arange(len(Y)))


def test_allocate_hits_every_margin_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(300):
        class_sizes = rng.integers(20, 60, size=rng.integers(1, 10))
        f = np.round(rng.dirichlet(np.ones(rng.integers(2, 5))), 2)
        f[-1] = 1.0 - f[:-1].sum()
        if f[-1] < 0:
            continue
        sizes = np.array(part_sizes(int(class_sizes.sum()), tuple(f)))
        counts = allocate(class_sizes, sizes)
        assert np.array_equal(counts.sum(axis=1), class_sizes)
        assert np.array_equal(counts.sum(axis=0), sizes)
        exact = np.outer(class_sizes, sizes) / class_sizes.sum()
        if exact.min() >= 1:  # no class needed topping up to reach a part
            assert np.all(np.abs(counts - exact) < 1.0)
        assert np.all(counts[:, sizes >= len(class_sizes)] >= 1)
