"""Checkpoints are plain data: JSON values and arrays round-trip; anything else is refused."""

import math
import pickle

import numpy as np
import pytest

from evomerge import plaindata


def test_values_and_arrays_round_trip():
    state = {
        "n": 3,
        "x": 0.25,
        "inf": -math.inf,
        "flag": True,
        "none": None,
        "name": "pop",
        "nested": [1, (2, 3), {"a": np.arange(4, dtype=np.float32)}],
        "bigint": 2**100 + 7,
        "scalar": np.float64(1.5),
        "matrix": np.eye(3),
    }
    out = plaindata.loads(plaindata.dumps(state))
    assert out["n"] == 3 and out["x"] == 0.25 and out["inf"] == -math.inf
    assert out["flag"] is True and out["none"] is None and out["name"] == "pop"
    assert out["nested"][1] == [2, 3]  # tuples come back as lists
    np.testing.assert_array_equal(out["nested"][2]["a"], np.arange(4, dtype=np.float32))
    assert out["nested"][2]["a"].dtype == np.float32
    assert out["bigint"] == 2**100 + 7 and out["scalar"] == 1.5
    np.testing.assert_array_equal(out["matrix"], np.eye(3))


@pytest.mark.parametrize(
    "bad",
    [{"s": {1, 2}}, {"b": b"raw"}, {1: "int key"}, {"o": object()}, {"a": np.array([object()])}],
    ids=["set", "bytes", "int-key", "object", "object-array"],
)
def test_anything_else_is_refused_not_pickled(bad):
    with pytest.raises(plaindata.NotPlainData):
        plaindata.dumps(bad)


def test_a_pickle_is_never_loaded():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    with pytest.raises(ValueError, match="not a plain-data state"):
        plaindata.loads(pickle.dumps({"x": Boom()}))
