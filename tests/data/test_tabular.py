import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from dlkit.config import DataCfg
from dlkit.data import DATASETS, load_data
from dlkit.data.preprocess import prep_from_dict, read_input
from dlkit.data.split import part_sizes, stratified_split
from dlkit.data.tabular import table_bundle
from dlkit.errors import DataError

CANCER = load_breast_cancer()
HINT = "pass --data PATH to a CSV with a header row and the label in the last column"


def test_breast_cancer_bundle_is_standardised_with_train_statistics():
    assert "breast_cancer" in DATASETS and "csv_table" in DATASETS
    cfg = DataCfg(name="breast_cancer", val_split=0.0, test_split=0.2, normalize="standard")
    b = load_data(cfg, seed=0)
    assert (len(b.train), len(b.test)) == (455, 114) and b.val is None
    assert b.train.x.shape == (455, 30) and b.train.x.dtype == torch.float32
    assert b.train.y.shape == (455,) and b.train.y.dtype == torch.float32
    assert set(b.train.y.unique().tolist()) == {0.0, 1.0}
    assert b.classes == ["malignant", "benign"]
    assert (b.task, b.input_kind, b.input_shape, b.num_outputs) == ("binary", "tabular", (30,), 1)
    assert torch.allclose(b.train.x.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(b.train.x.std(0, unbiased=False), torch.ones(30), atol=1e-4)
    assert b.test.x.mean(0).abs().max().item() > 0.01  # the test rows did not set the scale
    tr, _, te = stratified_split(CANCER.target, (0.8, 0.0, 0.2), seed=0)
    assert b.preprocessing["mean"] == pytest.approx(CANCER.data[tr].mean(0).tolist())
    assert b.preprocessing["feature_names"] == list(CANCER.feature_names)
    assert torch.equal(b.test.y, torch.from_numpy(CANCER.target[te]).float())
    counts = b.meta["class_counts"]
    assert [sum(c) for c in zip(*counts.values())] == [212, 357]


def test_scale_is_min_max_and_none_is_raw():
    b = load_data(DataCfg(name="breast_cancer", normalize="scale"), seed=1)
    assert torch.allclose(b.train.x.min(0).values, torch.zeros(30))
    assert torch.allclose(b.train.x.max(0).values, torch.ones(30))
    assert b.preprocessing["method"] == "minmax"
    raw = load_data(DataCfg(name="breast_cancer", normalize="none"), seed=1)
    assert [len(raw.train), len(raw.val), len(raw.test)] == part_sizes(569, (0.7, 0.1, 0.2))
    tr, _, _ = stratified_split(CANCER.target, (0.7, 0.1, 0.2), seed=1)
    assert torch.allclose(raw.train.x, torch.from_numpy(CANCER.data[tr]).float())
    assert raw.preprocessing["mean"] is None


def test_fingerprint_and_prediction_input_match_training():
    cfg = DataCfg(name="breast_cancer", normalize="standard")
    a, b, c = load_data(cfg, 0), load_data(cfg, 0), load_data(cfg, 7)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    tr, _, _ = stratified_split(CANCER.target, (0.7, 0.1, 0.2), seed=0)
    inline = ",".join(str(float(v)) for v in CANCER.data[tr[0]])
    x = read_input(inline, prep_from_dict(a.preprocessing))
    assert torch.allclose(x[0], a.train.x[0], atol=1e-5)


def _write(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_csv_table_multiclass_and_binary(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["owl", "cat", "dog"] * 20
    rows = [[round(rng.normal(), 4), round(rng.normal(), 4), lab] for lab in labels]
    _write(tmp_path / "pets.csv", ["f1", "f2", "kind"], rows)
    b = load_data(DataCfg(name="csv_table", path=str(tmp_path / "pets.csv"), normalize="standard"), 0)
    assert b.classes == ["cat", "dog", "owl"] and b.task == "multiclass"
    assert b.train.y.dtype == torch.int64 and b.input_shape == (2,)
    assert [len(b.train), len(b.val), len(b.test)] == [42, 6, 12]
    assert b.meta["class_counts"]["test"] == [4, 4, 4]
    assert b.preprocessing["feature_names"] == ["f1", "f2"]
    assert "label column 'kind'" in b.meta["source"]

    _write(tmp_path / "num.csv", ["a", "y"], [[i, 10 if i % 2 else 2] for i in range(20)])
    b = load_data(DataCfg(name="csv_table", path=str(tmp_path / "num.csv"), normalize="none"), 0)
    assert b.classes == ["2", "10"] and b.task == "binary"  # numeric labels sort as numbers
    assert torch.equal(b.train.y, (b.train.x[:, 0] % 2 == 1).float())


def test_csv_table_errors_say_what_to_do(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    _write(tmp_path / "head.csv", ["a", "y"], [])
    _write(tmp_path / "word.csv", ["a", "b", "y"], [[1, 2, "x"], [3, "abc", "y"]])
    _write(tmp_path / "ragged.csv", ["a", "b", "y"], [[1, 2, "x"], [3, "y"]])
    _write(tmp_path / "one.csv", ["a", "y"], [[1, "x"], [2, "x"]])
    cases = {
        "missing.csv": f"data file {tmp_path / 'missing.csv'} not found; {HINT}",
        "empty.csv": f"data file {tmp_path / 'empty.csv'} is empty or has only a header; {HINT}",
        "head.csv": "is empty or has only a header",
        "word.csv": "line 3, column 'b' holds 'abc', not a number; feature columns must be numeric",
        "ragged.csv": "line 3 has 2 values but the header has 3",
        "one.csv": "the label column 'y' holds one class ('x'); classifying needs 2 or more",
    }
    for name, message in cases.items():
        with pytest.raises(DataError) as info:
            load_data(DataCfg(name="csv_table", path=str(tmp_path / name)), 0)
        assert message in str(info.value)
    with pytest.raises(DataError, match="csv_table needs a file; pass --data PATH"):
        load_data(DataCfg(name="csv_table"), 0)


def test_table_bundle_needs_a_test_split():
    x, y = np.zeros((10, 2)), np.arange(10) % 2
    with pytest.raises(DataError, match="set data.test_split > 0"):
        table_bundle(x, y, ["a", "b"], ["u", "v"], DataCfg(name="t", test_split=0.0), 0, "toy")
