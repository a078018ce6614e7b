"""Choice options are StrEnums: ``--help`` lists them; a bad value is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldct_node import cli
from ldct_node.choices import Geometry, Role
from ldct_node.cli.common import choice


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("serve", "--role", "scheduler"),
            "--role: expected one of all, receiver, worker, got 'scheduler'",
        ),
        (
            ("train", "--method", "E"),
            "--method: expected one of C, A, B, D, C-cnn10, D-cnn10, got 'E'",
        ),
        (
            ("train", "--lr-schedule", "step"),
            "--lr-schedule: expected one of constant, cosine, got 'step'",
        ),
        (
            ("train", "--perceptual-norm", "l1"),
            "--perceptual-norm: expected one of none, calibrated, got 'l1'",
        ),
        (("simulate", "--geometry", "cone"), "--geometry: expected parallel or fan, got 'cone'"),
        (("simulate", "--phantom", "skull"), "--phantom: expected body, water or qa, got 'skull'"),
    ],
)
def test_a_bad_choice_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], line: str
) -> None:
    command, *rest = args
    where = {
        "serve": ["--config", tmp_path / "missing.toml"],
        "train": ["--data", tmp_path, "--output", tmp_path / "out"],
        "simulate": ["--output", tmp_path / "out"],
    }[command]
    rc, out, err = run(capsys, command, *where, *rest)
    assert (rc, out, err) == (2, "", f"error: {line}\n")
    assert not (tmp_path / "out").exists()


def test_choices_parse_into_their_enum_and_show_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert choice(Role, "--role")("worker") is Role.WORKER
    assert choice(Geometry, "--geometry", listing="or")(Geometry.FAN) is Geometry.FAN
    rc, out, _ = run(capsys, "serve", "--help")
    assert rc == 0 and "all|receiver|worker" in out
    rc, out, _ = run(capsys, "simulate", "--help")
    assert rc == 0 and "parallel|fan" in out and "body|water|qa" in out
