"""Config loading, inheritance, overrides and validation messages."""

import re
from pathlib import Path

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
        (["--method.name", "kdd"], "choose one of: ce, afdcd, cirkd, cwd, ifvd, kd, skd"),
        (["--fotf.enabled", "true", "--fotf.num_samples", "1"], "fotf.num_samples = 1 must be an integer >= 2"),
        (["--fotf.enabled", "true", "--fotf.kappa", "0"], "fotf.kappa = 0.0 must be a finite number > 0"),
        (["--fotf.enabled", "true", "--fotf.m", "-1"], "fotf.m = -1.0 must be a finite number > 0"),
        (["--fotf.enabled", "true", "--fotf.p", "1.5"], r"fotf.p = 1.5 must be null .* or in \(0, 1\)"),
        (["--fotf.enabled", "true", "--fotf.merge_kd", "pixels"],
         "fotf.merge_kd = 'pixels' is not valid; choose one of: none, per_pixel, per_class, per_image, batch_mean"),
        (["--fotf.enabled", "true", "--fotf.mode", "head"], "fotf.mode = 'head' is not valid; choose one of: exact, naive, classifier"),
        (["--fotf.enabled", "true", "--fotf.weighting", "linear"], "choose one of: power, exp"),
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


# The paper's merge words read two ways (see fotf_hf/fotf.py): the config refuses them and shows
# the mapping, literal reading first.
PAPER_WORD_ROWS = {"channel": r"channel\s+-> per_pixel\b.*\bper_class", "pixel": r"pixel\s+-> per_class\b.*\bper_pixel",
                   "sample": r"sample\s+-> batch_mean\b.*\bper_image"}


def _assert_mapping_message(message, field, word):
    import re

    assert f"fotf.{field} = {word!r}" in message
    for row in PAPER_WORD_ROWS.values():  # the whole table, whichever word was given
        assert re.search(row, message), (row, message)
    assert "none, per_pixel, per_class, per_image, batch_mean" in message


@pytest.mark.parametrize("field", ["merge_kd", "merge_ce"])
@pytest.mark.parametrize("word", list(PAPER_WORD_ROWS))
def test_paper_merge_words_are_refused_with_the_mapping_table(tmp_path, field, word):
    yaml_file = write(tmp_path / "run.yaml", {"fotf": {"enabled": True, field: word}})
    with pytest.raises(ConfigError) as from_yaml:
        load_config(yaml_file)
    _assert_mapping_message(str(from_yaml.value), field, word)
    with pytest.raises(ConfigError) as from_cli:
        load_config(None, ["--fotf.enabled", "true", f"--fotf.{field}", word])
    assert str(from_cli.value) == str(from_yaml.value)
    # either reading, spelt out, is accepted
    for value in ("per_pixel", "per_class", "per_image", "batch_mean", "none"):
        assert getattr(load_config(None, ["--fotf.enabled", "true", f"--fotf.{field}", value]).fotf, field) == value


def test_a_config_written_by_an_earlier_version_fails_with_the_mapping_table(tmp_path):
    # What save_config wrote for a FOTF run before the merges were renamed and `head` sampling became `classifier`.
    old = tmp_path / "fotf_config.yaml"
    old.write_text("method: {name: ce}\n"
                   "fotf: {enabled: true, num_samples: 5, p: null, m: 1.0, kappa: 3.0, weighting: power,\n"
                   "       merge_kd: channel, merge_ce: pixel, apply_to: ce, mode: head, source: student}\n")
    with pytest.raises(ConfigError) as error:
        load_config(old)
    _assert_mapping_message(str(error.value), "merge_kd", "channel")
    # with the merges spelt out, the old `head` mode is named next
    with pytest.raises(ConfigError, match="fotf.mode = 'head' is not valid; choose one of: exact, naive, classifier"):
        load_config(old, ["--fotf.merge_kd", "per_pixel", "--fotf.merge_ce", "per_class"])
    cfg = load_config(old, ["--fotf.merge_kd", "per_pixel", "--fotf.merge_ce", "per_class", "--fotf.mode", "classifier"])
    assert (cfg.fotf.merge_kd, cfg.fotf.merge_ce, cfg.fotf.mode, cfg.fotf.kappa) == ("per_pixel", "per_class", "classifier", 3.0)


def test_new_defaults_are_the_literal_paper_readings_and_a_student_without_head_dropout_is_accepted():
    cfg = load_config(None, ["--fotf.enabled", "true"])
    assert (cfg.fotf.merge_kd, cfg.fotf.merge_ce, cfg.fotf.mode, cfg.fotf.p) == ("per_pixel", "per_class", "exact", None)
    # DeepLabV3 keeps its ASPP dropout as an MC site: head dropout 0 is no longer refused up front
    # (a model without any active site fails when FOTF samples it; see tests/test_models.py).
    assert load_config(None, ["--fotf.enabled", "true", "--student.mc_dropout_p", "0"]).student.mc_dropout_p == 0.0


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "scripts" / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name != "base"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_its_weights_are_documented(path):
    """Each shipped YAML validates; each `pretrained/...` folder a paper row expects is named in
    README's "Paper setting" section with its conversion (the CamVid spelling stands for the others)."""
    cfg = load_config(path)
    readme = (path.parents[3] / "README.md").read_text()
    section = readme.split("## Paper setting", 1)[1].split("\n## ", 1)[0]
    for model in (cfg.student, cfg.teacher):
        value = getattr(model, "pretrained", None) or ""
        if value.startswith("pretrained/"):
            camvid_name = re.sub(r"-(cityscapes|voc)$", "-camvid", value)
            assert camvid_name in section, f"{path.name}: {value} is not in README's Paper setting"
