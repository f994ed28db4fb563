"""The YAML config is validated at start, and every message names the offending key."""

import pytest

from daemon.config import ConfigError, load_config, parse_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "edgellm.yaml"
    path.write_text("listen:\n  tcp: 127.0.0.1:50051\nengine:\n  slots: 8\n")
    cfg = load_config(path)
    assert cfg.engine.slots == 8
    assert cfg.listen.tcp == "127.0.0.1:50051"
    assert cfg.listen.unix  # the default socket stays on
    assert cfg.generation.default_max_new_tokens == 512
    assert cfg.generation.stream_interval_ms == "auto"
    assert parse_config({"generation": {"stream_interval_ms": 40}}).generation.stream_interval_ms == 40


@pytest.mark.parametrize("doc, key", [
    ({"engine": {"slotz": 2}}, "engine.slotz"),
    ({"bogus": 1}, "bogus"),
    ({"engine": {"slots": 0}}, "engine.slots"),
    ({"engine": {"slots": "four"}}, "engine.slots"),
    ({"engine": {"slots": True}}, "engine.slots"),
    ({"logging": {"level": "loud"}}, "logging.level"),
    ({"listen": {"unix": None, "tcp": None}}, "listen"),
    ({"engine": []}, "engine"),
    ({"listen": {"tcp": "localhost"}}, "listen.tcp"),  # addresses fail at parse time, not after the model load
    ({"service": {"metrics": "127.0.0.1:port"}}, "service.metrics"),
    ({"generation": {"stream_interval_ms": 1001}}, "generation.stream_interval_ms"),
    ({"generation": {"stream_interval_ms": -1}}, "generation.stream_interval_ms"),
    ({"generation": {"stream_interval_ms": "fast"}}, "generation.stream_interval_ms"),
])
def test_bad_values_name_the_key(doc, key):
    with pytest.raises(ConfigError, match=f"'?{key}'?"):
        parse_config(doc)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
