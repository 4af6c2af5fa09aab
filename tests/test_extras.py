import pytest
from avr.errors import MissingExtraError
from avr.extras import require

def test_a_missing_optional_module_names_the_extra_that_installs_it():
    with pytest.raises(MissingExtraError, match=r"avr export needs nosuchmodule, which is not installed: pip install 'avr\[nosuchmodule\]'"):
        require("nosuchmodule", "avr export")

def test_an_installed_optional_module_is_returned():
    assert require("json", "x").dumps([1]) == "[1]"
