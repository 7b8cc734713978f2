"""Config loading, inheritance, overrides and validation messages."""

import pytest
import yaml

from fotf_hf.config import ConfigError, ExperimentConfig, load_config, parse_overrides, save_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_valid_and_plain_ce():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.method.name == "ce" and not cfg.fotf.enabled and not cfg.needs_teacher


def test_base_inheritance_and_deep_merge(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "b.yaml", {"optim": {"lr": 0.02, "max_steps": 100}, "fotf": {"kappa": 3}})
    leaf = write(tmp_path / "leaf.yaml", {"base": "base/b.yaml", "optim": {"max_steps": 7}, "fotf": {"enabled": True}})
    cfg = load_config(leaf)
    assert cfg.optim.lr == 0.02 and cfg.optim.max_steps == 7
    assert cfg.fotf.enabled and cfg.fotf.kappa == 3.0


def test_two_levels_of_base_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"optim": {"lr": 0.1}})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    leaf = write(tmp_path / "c.yaml", {"base": "b.yaml"})
    with pytest.raises(ConfigError, match="only one level"):
        load_config(leaf)


def test_cli_overrides_both_spellings_and_yaml_values():
    cfg = load_config(None, ["--fotf.kappa", "5", "--set", "optim.lr=1e-3", "--data.crop_size=[64,80]"])
    assert cfg.fotf.kappa == 5.0 and cfg.optim.lr == pytest.approx(1e-3) and cfg.data.crop_size == [64, 80]
    assert parse_overrides(["--a.b.c", "null"]) == {"a": {"b": {"c": None}}}


def test_yaml_scientific_notation_string_is_coerced(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string.
    leaf = tmp_path / "x.yaml"
    leaf.write_text("optim:\n  weight_decay: 1e-4\n")
    assert load_config(leaf).optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--fotf.kapa", "5"], "did you mean 'kappa'"),
        (["--methd.name", "kd"], "did you mean 'method'"),
        (["--method.name", "kdd"], "choose one of: ce, kd, cirkd, afdcd, skd, ifvd, cwd"),
        (["--fotf.enabled", "true", "--fotf.num_samples", "1"], "must be >= 2"),
        (["--fotf.enabled", "true", "--fotf.kappa", "0"], "fotf.kappa = 0.0 must be > 0"),
        (["--fotf.enabled", "true", "--fotf.m", "-1"], "fotf.m = -1.0 must be > 0"),
        (["--fotf.enabled", "true", "--fotf.p", "1.5"], r"fotf.p = 1.5 must be in \(0, 1\)"),
        (["--fotf.enabled", "true", "--fotf.merge_kd", "pixels"], "did you mean 'pixel'"),
        (["--fotf.enabled", "true", "--fotf.weighting", "linear"], "choose one of: power, exp"),
        (["--fotf.enabled", "true", "--student.mc_dropout_p", "0"], "no active dropout site"),
        (["--optim.lr", "abc"], "optim.lr = 'abc' is not a valid float"),
        (["--optim.max_steps", "0"], "optim.max_steps = 0 must be >= 1"),
        (["--data.name", "camvidd"], "did you mean 'camvid'"),
        (["--method.name", "kd"], "needs a teacher"),
        (["--method.name", "kd", "--teacher.arch", "deeplabv3"], "teacher.pretrained is empty"),
        (["--hub.push_to_hub", "true"], "hub.repo_id is empty"),
        (["--run.mixed_precision", "fp8"], "choose one of: no, fp16, bf16"),
    ],
)
def test_validation_errors_name_the_value_and_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["--fotf.enabled", "true", "--fotf.kappa", "7", "--method.name", "kd",
                             "--teacher.pretrained", "some/folder"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
