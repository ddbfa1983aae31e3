"""The `--planner*` flags: defaults, parsing, and errors that name the flag."""

from __future__ import annotations

import argparse

import pytest

from cli.planner_options import (
    add_planner_arguments,
    parse_role_counts,
    planner_argv,
    planner_config_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_planner_arguments(p)
    return p.parse_args(argv)


def test_defaults_give_an_off_planner() -> None:
    cfg = planner_config_from_args(parse())
    assert (cfg.mode, cfg.interval_s, cfg.stable_s, cfg.cooldown_s) == ("off", 1.0, 30.0, 120.0)
    assert cfg.min_per_role == {} and cfg.max_per_role == {} and not cfg.allow_load_on_demand


def test_every_flag_reaches_the_config() -> None:
    args = parse(
        "--planner", "advise", "--planner-interval", "0.5", "--planner-stable-seconds", "12",
        "--planner-cooldown-seconds", "60", "--planner-min", "D=2", "--planner-min", "e=0",
        "--planner-max", "E=4", "--planner-load-on-demand",
    )  # fmt: skip
    cfg = planner_config_from_args(args)
    assert (cfg.mode, cfg.interval_s, cfg.stable_s, cfg.cooldown_s) == ("advise", 0.5, 12.0, 60.0)
    assert cfg.min_per_role == {"D": 2, "E": 0} and cfg.max_per_role == {"E": 4}
    assert cfg.allow_load_on_demand


def test_unknown_mode_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--planner", "auto")
    assert "invalid choice: 'auto'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["D"], "wants ROLE=N"),
        (["X=1"], "wants ROLE=N"),
        (["D=two"], "whole number"),
        (["D=-1"], "0 or more"),
        (["D=1", "D=2"], "names D twice"),
    ],
)
def test_bad_role_counts_name_the_flag(values: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_role_counts(values, "--planner-min")
    assert "--planner-min" in str(info.value)


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="under its minimum"):
        planner_config_from_args(parse("--planner-min", "P=3", "--planner-max", "P=2"))


def test_every_flag_states_its_default() -> None:
    p = argparse.ArgumentParser()
    add_planner_arguments(p)
    for action in p._actions:
        if action.dest.startswith("planner"):
            assert "default" in (action.help or ""), f"{action.option_strings} does not state its default"


def test_planner_argv_gives_the_same_config_again() -> None:
    args = parse(
        "--planner", "on", "--planner-stable-seconds", "7.5", "--planner-min", "D=2",
        "--planner-max", "E=3", "--planner-load-on-demand",
    )  # fmt: skip
    cfg = planner_config_from_args(args)
    assert planner_config_from_args(parse(*planner_argv(cfg))) == cfg
    assert planner_argv(planner_config_from_args(parse())) == []
