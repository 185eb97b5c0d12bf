"""Keras layout round trips as property tests: import -> export -> import is the identity.

A Keras-layout source (drawn at random: recurrent layers, Dense, Conv) is loaded into the
equivalent PyTorch model, exported back to Keras arrays and to a ``.weights.h5``, and the
arrays read back must equal the originals bit for bit. Needs h5py only, not Keras.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import weightport
from weightport.layouts import get_layout
from weightport.sources import open_source

pytest.importorskip("h5py")
keras_layout = get_layout("keras")


@st.composite
def models(draw):  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    hidden = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 3))
    bidirectional = draw(st.booleans())
    width = draw(st.integers(1, 4))
    model = nn.Module()
    model.rnn = getattr(nn, kind)(
        draw(st.integers(1, 4)), hidden, num_layers=layers, bidirectional=bidirectional
    )
    model.head = nn.Linear(hidden * (2 if bidirectional else 1), width)
    if draw(st.booleans()):
        model.conv = nn.Conv1d(width, 2, draw(st.integers(1, 3)))
    return model


@settings(max_examples=25, deadline=None)
@given(model=models(), seed=st.integers(0, 2**16))
def test_keras_import_export_import_is_identity(tmp_path_factory, model: nn.Module, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", weightport.UncheckedConfigWarning)
        # A Keras-layout source: what Keras would hold for this model, with random values.
        keras = {
            k: rng.standard_normal(v.shape).astype(np.float32) for k, v in keras_layout.export(model).items()
        }
        weightport.load(model, keras, layout="keras")
        again = keras_layout.export(model)
        assert set(again) == set(keras)
        for key, value in keras.items():
            np.testing.assert_array_equal(again[key], value, err_msg=key)
        path = keras_layout.save_weights_h5(model, tmp_path_factory.mktemp("k") / "m.weights.h5")
        with open_source(path) as src:
            for key, value in keras.items():
                np.testing.assert_array_equal(src.read(key), value, err_msg=key)
