"""The generic registry: names are validated, lookups name the registered set, lazy targets resolve."""

import pytest

from emotion_neurons.registry import Registry


def test_register_lookup_and_errors():
    reg: Registry = Registry("selector")

    @reg.register("lap")
    def lap():
        return 1

    assert reg["lap"] is lap and "lap" in reg and reg.names() == ("lap",)
    with pytest.raises(KeyError, match="selector 'mad' unknown; registered: lap"):
        reg["mad"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("lap", lambda: 2)
    for bad in ("cas-signed", "Cas", "1x", ""):
        with pytest.raises(ValueError, match="invalid"):
            reg.register(bad, lap)


def test_lazy_target_and_pattern_and_temporary():
    import re

    reg: Registry = Registry("thing")
    reg.register("dumps", "json:dumps")
    reg.register("dump", "json:dump")
    import json

    assert reg["dumps"] is json.dumps
    # longest first, so a regex alternation never stops at a prefix of another name
    assert re.fullmatch(reg.pattern(), "dumps") and re.fullmatch(reg.pattern(), "dump")
    assert not re.fullmatch(reg.pattern(), "dumpsx")
    with reg.temporarily("extra", len):
        assert reg["extra"] is len
    assert "extra" not in reg
    assert Registry("empty").pattern() == "(?!)"
