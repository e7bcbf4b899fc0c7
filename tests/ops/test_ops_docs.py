"""The runnable examples in the ops docstrings run and print what they claim."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["delta_rule", "linear_attention", "softmax_attention"])
def test_docstring_examples(module):
    # importlib: `hybridlm.ops.delta_rule` as an attribute is the function, not the module
    mod = importlib.import_module(f"hybridlm.ops.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
