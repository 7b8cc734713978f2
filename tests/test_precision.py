"""`run.mixed_precision`: the hardware resolver (`auto`) and YAML booleans for string choices."""

import logging

import pytest
import torch

from fotf_hf.config import PRECISIONS, ConfigError, load_config
from fotf_hf.training import precision
from fotf_hf.training.precision import cpu_bf16_support, resolve_mixed_precision


@pytest.fixture
def cpu_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "amx_bf16/avx512_bf16"))


@pytest.fixture
def cpu_avx2(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "avx2 only"))


def test_auto_on_cpu_with_native_bf16_is_bf16(cpu_native, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert resolve_mixed_precision("auto", torch.device("cpu"), announce=seen.append) == "bf16"
    assert seen == ["mixed precision: auto -> bf16 (CPU with native bf16: amx_bf16/avx512_bf16)"]
    assert seen[0] in caplog.text


def test_auto_on_cpu_without_native_bf16_is_fp32(cpu_avx2, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert resolve_mixed_precision("auto", "cpu", announce=seen.append) == "no"
    assert seen == ["mixed precision: auto -> no (CPU without native bf16: avx2 only)"]
    assert [r.levelno for r in caplog.records] == [logging.INFO]


@pytest.mark.parametrize("bf16_ok, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: pytest.fail("CUDA must not probe the CPU"))
    assert resolve_mixed_precision("auto", "cuda:0") == expected


def test_auto_on_another_accelerator_is_fp32(cpu_native):
    assert resolve_mixed_precision("auto", "meta") == "no"


@pytest.mark.parametrize("requested", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_values_pass_through(cpu_native, monkeypatch, requested, device, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert resolve_mixed_precision(requested, device) == requested
    assert not caplog.records


def test_explicit_bf16_on_cpu_without_native_bf16_warns(cpu_avx2, caplog):
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "avx2 only" in record.message and "~10x slower" in record.message
    assert "auto" in record.message and "no" in record.message


def test_explicit_no_or_fp16_on_slow_cpu_does_not_warn(cpu_avx2, caplog):
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert resolve_mixed_precision("no", "cpu") == "no"
        assert resolve_mixed_precision("fp16", "cpu") == "fp16"
    assert not caplog.records


def test_resolver_rejects_unknown_values():
    with pytest.raises(ValueError, match="no, fp16, bf16, auto"):
        resolve_mixed_precision("fp8", "cpu")


def test_cpu_probe_requires_bf16_instructions_on_x86(monkeypatch):
    # oneDNN's own check passes on plain AVX512 (bf16 emulated): not native.
    monkeypatch.setattr(precision, "_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: {"architecture": "x86_64", "avx512_f": True})
    assert cpu_bf16_support()[0] is False
    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: {"architecture": "x86_64", "amx_bf16": True})
    assert cpu_bf16_support() == (True, "amx_bf16")
    monkeypatch.setattr(precision, "_mkldnn_bf16_supported", lambda: False)
    assert cpu_bf16_support()[0] is False


def test_cpu_probe_on_this_machine_returns_a_bool_and_a_note():
    native, note = cpu_bf16_support()
    assert isinstance(native, bool) and isinstance(note, str) and note


# --------------------------------------------------------------------------- config


def test_default_is_auto_and_listed_once():
    assert PRECISIONS == ("no", "fp16", "bf16", "auto")
    assert load_config().run.mixed_precision == "auto"


def test_override_no_is_the_string_no():
    # YAML reads the override value `no` as False; the field's choices turn it back into "no".
    assert load_config(overrides=["--run.mixed_precision", "no"]).run.mixed_precision == "no"
    assert load_config(overrides=["--set", "run.mixed_precision=no"]).run.mixed_precision == "no"


def test_unquoted_no_in_yaml_loads_as_no(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  mixed_precision: no\n")
    assert load_config(path).run.mixed_precision == "no"


def test_invalid_precision_lists_the_choices_with_auto():
    with pytest.raises(ConfigError, match="choose one of: no, fp16, bf16, auto"):
        load_config(overrides=["--run.mixed_precision", "fp8"])


def test_true_has_no_precision_meaning():
    with pytest.raises(ConfigError, match="run.mixed_precision = True is not a valid str.*quote the value"):
        load_config(overrides=["--run.mixed_precision", "yes"])


def test_bool_for_a_str_field_without_such_choice_still_errors():
    with pytest.raises(ConfigError, match="run.output_dir = False is not a valid str"):
        load_config(overrides=["--run.output_dir", "no"])
    with pytest.raises(ConfigError, match="student.arch = True is not a valid str"):
        load_config(overrides=["--student.arch", "on"])


# --------------------------------------------------------------------------- train()


class _Built(Exception):
    pass


@pytest.mark.parametrize("native, expected", [(False, "no"), (True, "bf16")])
def test_train_builds_its_accelerator_with_the_resolved_precision(tmp_path, monkeypatch, capsys, native,
                                                                  expected):
    import fotf_hf.training.loop as loop

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (native, "test cpu"))
    state = type("State", (), {"device": torch.device("cpu"), "print": staticmethod(print)})()
    monkeypatch.setattr(loop, "PartialState", lambda **kwargs: state)

    def fake_accelerator(**kwargs):
        raise _Built(kwargs["mixed_precision"])

    monkeypatch.setattr(loop, "Accelerator", fake_accelerator)
    cfg = load_config(overrides=["--run.output_dir", str(tmp_path / "run")])
    with pytest.raises(_Built, match=f"^{expected}$"):
        loop.train(cfg)
    assert f"mixed precision: auto -> {expected}" in capsys.readouterr().out
