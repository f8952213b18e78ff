"""Typed config: YAML loading, --set overrides, and errors that name key, file and valid keys."""
import pytest
import yaml

from lumo_ray.config import ConfigError, LumoConfig, dump_config, load_config


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("uti:\n  audio:\n    bandwidth: 3\n")
    cfg = load_config(LumoConfig, p)
    assert cfg.uti.audio.bandwidth == 3.0 and isinstance(cfg.uti.audio.bandwidth, float)
    assert cfg.uti.image.kind == "vq"


def test_set_overrides_parse_values(tmp_path):
    cfg = load_config(LumoConfig, None, ["uti.audio.model=tiny-48k", "uti.token_space.special_slots=32",
                                         "uti.text.load=false"])
    assert cfg.uti.audio.model == "tiny-48k"
    assert cfg.uti.token_space.special_slots == 32
    assert cfg.uti.text.load is False


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("uti:\n  audio:\n    bandwith: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(LumoConfig, p)
    msg = str(e.value)
    assert "uti.audio.bandwith" in msg and str(p) in msg and "bandwidth" in msg and "sample_rate" in msg


def test_wrong_type_and_literal(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("uti:\n  token_space:\n    special_slots: many\n")
    with pytest.raises(ConfigError, match=r"uti.token_space.special_slots.*expected int"):
        load_config(LumoConfig, p)
    with pytest.raises(ConfigError, match=r"uti.image.kind.*not one of"):
        load_config(LumoConfig, None, ["uti.image.kind=jpeg"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(LumoConfig, None, ["uti.image.kind"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(LumoConfig, None, ["uti.audio.bandwidth=6.0"])
    p = dump_config(cfg, tmp_path)
    again = load_config(LumoConfig, p)
    assert again == cfg
    assert yaml.safe_load(p.read_text())["uti"]["audio"]["bandwidth"] == 6.0
