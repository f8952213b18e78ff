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


def test_one_precedence_default_file_set_then_a_commands_flag(tmp_path):
    """dataclass default -> config file -> --set -> a command's named flag (an alias of a --set key, so
    the same parse: a path with a space and '#' stays one string, repeated --input a list)."""
    from lumo_ray.cli.common import command_config
    from lumo_ray.cli.main import build_parser

    f = tmp_path / "c.yaml"
    f.write_text("token_lm:\n  out: from-file\n  shards: file-shards\nlm:\n  out: lm-file\n")
    parse = build_parser().parse_args
    args = parse(["train", "token-lm", "--config", str(f), "--set", "token_lm.out=from-set",
                  "--set", "token_lm.base=set-base", "--out", "runs/a #1"])
    cfg = command_config(args, aliases={k: f"token_lm.{k}" for k in ("shards", "base", "out")})
    assert cfg.token_lm.out == "runs/a #1"  # the flag over --set over the file
    assert (cfg.token_lm.shards, cfg.token_lm.base) == ("file-shards", "set-base")
    assert cfg.token_lm.seq.max_len == LumoConfig().token_lm.seq.max_len  # untouched: the default
    args = parse(["train", "lm", "--config", str(f), "--input", "a b.jsonl", "--input", "c.txt"])
    cfg = command_config(args, aliases={"input": "lm.inputs", "out": "lm.out"})
    assert cfg.lm.inputs == ["a b.jsonl", "c.txt"] and cfg.lm.out == "lm-file"  # no --out: the file's


def test_the_demo_recipes_are_config_files_with_reasons_that_the_demo_reads():
    """configs/demo/*.yaml (lumo_ray/assets/demo, shipped): each loads alone as --config (a stage can be
    rerun with it), each setting carries its reason, and the demo's settings are exactly these files."""
    from pathlib import Path

    from lumo_ray.config.recipes import DEMO_DATA, DEMO_MMPT, DEMO_TRAINING
    from lumo_ray.cli.common import command_config
    from lumo_ray.cli.main import build_parser
    from lumo_ray.config.load import file_sets

    here = Path(__file__).resolve().parents[1] / "configs" / "demo"
    assert sorted(p.name for p in here.glob("*.yaml")) == ["data.yaml", "lm.yaml", "mmpt.yaml", "token_lm.yaml"]
    for p in here.glob("*.yaml"):
        leaves = [ln for ln in p.read_text().splitlines() if ":" in ln.split("#")[0] and ln.split("#")[0].split(":")[1].strip()]
        assert leaves and all("#" in ln for ln in leaves), (p.name, [ln for ln in leaves if "#" not in ln])
        load_config(LumoConfig, p)
    assert DEMO_DATA == file_sets(here / "data.yaml")
    assert DEMO_TRAINING == file_sets(here / "lm.yaml") + file_sets(here / "token_lm.yaml")
    assert DEMO_MMPT == file_sets(here / "mmpt.yaml")
    args = build_parser().parse_args(["train", "token-lm", "--config", str(here / "token_lm.yaml"), "--out", "r"])
    cfg = command_config(args, aliases={"out": "token_lm.out"})
    assert (cfg.token_lm.train.steps, cfg.token_lm.new_row_lr, cfg.token_lm.out) == (500, 0.003, "r")
