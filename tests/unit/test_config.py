"""pipeline.core.config: validation errors name the bad field; memory sizes parse or fail clearly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.core.config import DEFAULT_TEMPLATES, ConfigError, ExtractConfig, build_config
from pipeline.core.units import parse_memory

BASE = {"input": "in/", "output": "out/"}


def test_unknown_key_is_rejected_and_named():
    with pytest.raises(ConfigError) as err:
        build_config("extract", {**BASE, "bogus": 1})
    msg = str(err.value)
    assert "'bogus'" in msg and "unknown key" in msg
    assert "shard_size" in msg  # the known keys are listed to help fix the typo


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"missing required 'output'"):
        build_config("extract", {"input": "in/"})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_later_layers_win_none_is_skipped_and_dashes_map_to_underscores():
    cfg = build_config("extract", {**BASE, "shard_size": 8, "batch_size": 32}, {"shard-size": 16, "batch_size": None},
                       None)
    assert isinstance(cfg, ExtractConfig)
    assert cfg.shard_size == 16
    assert cfg.batch_size == 32  # an earlier layer's: a None override does not erase it


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"'shard_size'"):
        build_config("extract", {**BASE, "shard_size": 0})
    with pytest.raises(ConfigError, match=r"'device'"):
        build_config("extract", {**BASE, "device": "tpu"})


def test_configs_are_frozen():
    cfg = build_config("extract", BASE)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.shard_size = 3


def test_template_without_name_placeholder_is_rejected():
    with pytest.raises(ConfigError) as err:
        build_config("classes", {**BASE, "templates": ["a photo of a {name}.", "a photo"]})
    assert "'a photo'" in str(err.value) and "{name}" in str(err.value)


def test_empty_template_list_is_rejected():
    with pytest.raises(ConfigError, match="at least one prompt template"):
        build_config("classes", {**BASE, "templates": []})


def test_default_templates_are_valid():
    cfg = build_config("classes", BASE)
    assert cfg.templates == DEFAULT_TEMPLATES
    assert all("{name}" in t for t in cfg.templates)


@pytest.mark.parametrize(
    "text, expected",
    [("16G", 16 * 2**30), ("512M", 512 * 2**20), ("1.5K", 1536), ("2GiB", 2 * 2**30), ("1gb", 2**30),
     (" 3 T ", 3 * 2**40), ("100", 100), ("100B", 100), (7, 7)],
)
def test_parse_memory_good(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "16X", "-1G", "0", "0.0M", "G", "1,5G", "16 G B", 0, -5])
def test_parse_memory_bad(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_index_config_checks_max_memory():
    good = {"features": "f", "model": "m", "output": "o"}
    assert build_config("index", {**good, "max_memory": "512M"}).max_memory == "512M"
    with pytest.raises(ConfigError, match=r"'max_memory'.*cannot parse memory size 'lots'"):
        build_config("index", {**good, "max_memory": "lots"})
