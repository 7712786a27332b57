"""Shared pytest setup: tests run once per backend process
(`KERAS_BACKEND=jax|tensorflow|torch pytest`) and start from a fixed seed."""

import os
import sys

import keras
import pytest

# `layer_testing` lives beside this file; make it importable from any
# sub-folder whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fixed_seed():
    keras.utils.set_random_seed(1337)
    yield
