"""retrain.config: the FitConfig table is the one source of `retrain fit`'s flags, their help, their
ranges and the config saved with each run. Table-driven, so a setting added later is held to it."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from conftest import one_error_line, run_cli
from retrain import cli
from retrain.config import FitConfig, bounded, check_number, check_ranges, type_of
from retrain.errors import ConfigError

FIELDS = list(fields(FitConfig))
NUMERIC = [f for f in FIELDS if type_of(f.type) in (int, float)]


def flags_of(f):
    return {f"--{f.name.replace('_', '-')}", f"--{f.name}", *f.metadata.get("aliases", ())}


def test_the_table_is_what_it_should_be():
    assert len(NUMERIC) >= 15  # the table-driven tests below really see the numbers
    for f in FIELDS:
        assert len(f.metadata.get("help", "")) >= 10, f"{f.name} has no help text"
    for f in NUMERIC:
        r = f.metadata.get("range")
        assert r is not None and len(r) >= 2 and r[0] < r[1], f"--{f.name} has no range"
    for f in FIELDS:
        if f.metadata.get("choices"):
            assert f.default in f.metadata["choices"], f.name


def test_the_defaults_are_within_their_ranges():
    check_ranges(FitConfig())  # nothing raised
    for f in NUMERIC:
        lo, hi, *allow = f.metadata["range"]
        assert f.default is None or lo <= f.default <= hi or f.default in allow, f.name


def _bad_values(f):
    lo, hi, *_ = f.metadata["range"]
    wide = hi - lo
    return [math.nan, math.inf, -math.inf, lo - max(1.0, wide), hi + max(1.0, wide), True]


@pytest.mark.parametrize("f", NUMERIC, ids=[f.name for f in NUMERIC])
def test_check_ranges_refuses_nan_infinity_and_out_of_range_naming_the_flag(f):
    for bad in _bad_values(f):
        cfg = FitConfig(**{f.name: bad})
        with pytest.raises(ConfigError) as e:
            check_ranges(cfg)
        msg = str(e.value)
        assert f"--{f.name}" in msg and "must be a number from" in msg, msg
    lo, hi, *_ = f.metadata["range"]
    check_ranges(FitConfig(**{f.name: lo}))  # both ends are allowed
    check_ranges(FitConfig(**{f.name: hi}))


def test_a_special_value_is_allowed_only_where_the_table_says():
    check_ranges(FitConfig(validation_batch_size=-1, test_batch_size=-1))  # -1: all
    with pytest.raises(ConfigError, match=r"--validation_batch_size must be a number from 1 to 10,000,000 "
                                          r"\(or -1\), got -2"):
        check_ranges(FitConfig(validation_batch_size=-2))
    with pytest.raises(ConfigError, match="--batch_size must be a number from 1 to 1,024, got -1"):
        check_ranges(FitConfig(batch_size=-1))


def test_bounded_reads_and_checks_a_flag_value():
    read = bounded(float, 0, 1, "--unknown-precision")
    assert read("0.5") == 0.5
    for text, match in (("nan", "got nan"), ("1e999", "got inf"), ("1.5", "from 0 to 1, got 1.5"),
                        ("high", "expects a float, got 'high'")):
        with pytest.raises(ConfigError, match=match):
            read(text)
    with pytest.raises(ConfigError, match="--top-k expects an int, got '2.5'"):
        bounded(int, 1, 10, "--top-k")("2.5")
    assert check_number("--x", 3, 0, 10) == 3


def _option_strings(command):
    p, _ = cli.build_parser(command)
    return {o: a.dest for a in p._actions for o in a.option_strings}


def test_every_setting_has_its_dash_underscore_and_alias_flags():
    opts = _option_strings("fit")
    for f in FIELDS:
        for flag in flags_of(f):
            assert opts.get(flag) == f.name, f"{flag} should set {f.name}"


@pytest.mark.parametrize("argv,expected", [
    (["--testing-percentage", "20"], {"testing_percentage": 20.0}),
    (["--testing_percentage", "20"], {"testing_percentage": 20.0}),
    (["--output_dir", "r"], {"output": "r"}),
    (["-o", "r"], {"output": "r"}),
    (["--bottleneck_dir", "c"], {"cache_dir": "c"}),
    (["--bf16"], {"fine_tune_bf16": True}),
    (["--fine_tune", "--unfreeze", "3"], {"fine_tune": True, "unfreeze": 3}),
    (["--how_many_training_steps", "7", "--learning_rate", "0.5"], {"how_many_training_steps": 7,
                                                                    "learning_rate": 0.5}),
    (["--flip-left-right", "--random_crop", "5"], {"flip_left_right": True, "random_crop": 5.0}),
])
def test_any_spelling_reaches_the_config(argv, expected):
    from retrain.config import config_from_args
    from retrain.fit import SWEEPABLE

    _, args = cli.parse(["fit", "photos", *argv])
    cfg = config_from_args(args, FitConfig, raw_lists=SWEEPABLE)  # as `retrain fit` reads them
    for k, v in expected.items():
        assert getattr(cfg, k) == v and type(getattr(cfg, k)) is type(v), k
    untouched = {f.name for f in FIELDS} - set(expected)
    assert all(getattr(cfg, k) == getattr(FitConfig(), k) for k in untouched)  # defaults from the table


def test_the_saved_config_repeats_the_run(tiny_run):
    import json

    saved = json.loads((tiny_run / "report.json").read_text())["config"]
    cfg = FitConfig(**saved)  # every key a setting, every value of its type
    assert cfg.to_dict() == saved


def test_fit_help_lists_every_flag_with_its_default():
    out = " ".join(run_cli("fit", "--help").stdout.split())  # argparse wraps the lines
    for f in FIELDS:
        assert f"--{f.name.replace('_', '-')}" in out, f.name
    assert "(default: 10.0)" in out and "(default: efficientnet_lite0+efficientnet_lite1)" in out


@pytest.mark.parametrize("args,flag", [
    (["--l2", "inf"], "--l2"),
    (["--seed", "-1"], "--seed"),
    (["--random-crop", "nan"], "--random"),
    (["--epochs", "0"], "--epochs"),
    (["--batch_size", "1e3"], "--batch"),
])
def test_the_cli_refuses_a_bad_number_in_one_line_before_any_work(tiny_dataset, tmp_path, args, flag):
    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "run", "--cache-dir", tmp_path / "cache", *args,
                check=False)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert flag in line and args[1] in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
