"""The suite's warning filters (pyproject.toml): a FutureWarning from compo's own calls fails the
test, including transformers' deprecated forward arguments, which warn at nn.Module's call path."""

import pytest
import torch
from transformers.utils.deprecation import deprecate_kwarg


class _Renamed(torch.nn.Module):
    """A forward whose argument was renamed the way transformers renames them (old name warns)."""

    @deprecate_kwarg("old", "99.0.0", new_name="new")
    def forward(self, new=None):
        return new


def test_a_deprecated_forward_argument_fails_the_test():
    with pytest.raises(FutureWarning, match="`old` is deprecated"):
        _Renamed()(old=1)


def test_a_future_warning_from_a_compo_module_fails_the_test():
    code = compile("import warnings\nwarnings.warn('renamed', FutureWarning)\n", "compo/_fake.py", "exec")
    with pytest.raises(FutureWarning, match="renamed"):
        exec(code, {"__name__": "compo._fake"})
