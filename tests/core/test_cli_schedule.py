"""`optserve schedule preview` and `optserve schedule plot`, through `service.cli.main`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from service.cli import main
from service.core.schedules import Schedule, ScheduleState, parse_schedule

STEP = '{"name": "step", "step_size": 30}'


class _Cycling(Schedule):
    """A schedule that cycles momentum, standing in for one_cycle / cyclic."""

    name: Literal["test_cycle"] = "test_cycle"
    reference: ClassVar[str] = "test"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * (1 + t % 2)

    def momentum_value(self, t: int) -> float | None:
        return 0.95 - 0.1 * (t % 2)


@pytest.fixture
def cycling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.cli.parse_schedule", lambda data: _Cycling())


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_preview_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "schedule", "preview", "--lr", "0.1", "--spec", STEP)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("# ")
    assert '"step_size": 30' in lines[0]
    assert lines[1].split() == ["step", "lr"]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 100  # --steps defaults to 100
    expected = parse_schedule(json.loads(STEP)).lrs(100, 0.1)
    for t, row in enumerate(rows):
        assert int(row[0]) == t
        assert float(row[1]) == pytest.approx(expected[t], rel=1e-7)
    assert float(rows[29][1]) == pytest.approx(0.1)
    assert float(rows[30][1]) == pytest.approx(0.01)
    assert float(rows[99][1]) == pytest.approx(1e-4)


def test_preview_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(
        capsys, "schedule", "preview", "--lr", "0.1", "--spec", STEP, "--steps", "65", "--json"
    )
    assert rc == 0
    doc: dict[str, Any] = json.loads(out)
    assert doc["schedule"]["name"] == "step"
    assert doc["schedule"]["step_size"] == 30
    assert (doc["base_lr"], doc["steps"], doc["momenta"]) == (0.1, 65, None)
    assert doc["lrs"] == parse_schedule(json.loads(STEP)).lrs(65, 0.1).tolist()  # exact


@pytest.mark.usefixtures("cycling")
def test_preview_with_momenta(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "schedule", "preview", "--lr", "0.5", "--spec", "{}", "--steps", "4")
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split() == ["step", "lr", "momentum"]
    assert [[float(v) for v in line.split()] for line in lines[2:]] == [
        [0, 0.5, 0.95],
        [1, 1.0, 0.85],
        [2, 0.5, 0.95],
        [3, 1.0, 0.85],
    ]
    rc, out, _ = _run(
        capsys, "schedule", "preview", "--lr", "0.5", "--spec", "{}", "--steps", "3", "--json"
    )
    doc = json.loads(out)
    assert doc["lrs"] == [0.5, 1.0, 0.5]
    assert doc["momenta"] == pytest.approx([0.95, 0.85, 0.95])


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "out.png"
    rc, out, err = _run(
        capsys,
        "schedule",
        "plot",
        "--lr",
        "0.1",
        "--spec",
        STEP,
        "--steps",
        "100",
        "--current-step",
        "45",
        "-o",
        str(target),
    )
    assert (rc, err) == (0, "")
    assert str(target) in out
    png = target.read_bytes()
    assert _png_size(png) == (800, 500)
    assert 5_000 <= len(png) <= 2_000_000


@pytest.mark.usefixtures("cycling")
def test_plot_with_momentum_axis(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "cycle.png"
    rc, _, _ = _run(
        capsys,
        "schedule",
        "plot",
        "--lr",
        "0.1",
        "--spec",
        "{}",
        "--steps",
        "20",
        "-o",
        str(target),
    )
    assert rc == 0
    assert _png_size(target.read_bytes()) == (800, 500)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ('{"name": "step"', "--spec is not valid JSON"),
        ("[1, 2]", "--spec must be a JSON object"),
        ('{"step_size": 30}', "schedule name is required"),
        ('{"name": "nope"}', "unknown schedule 'nope'"),
        ('{"name": "step"}', "step_size"),
        ('{"name": "step", "step_size": 0}', "step_size"),
        ('{"name": "step", "step_size": 30, "gama": 0.5}', "gama"),
    ],
)
@pytest.mark.parametrize("action", ["preview", "plot"])
def test_invalid_spec_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str, words: str, action: str
) -> None:
    extra = ["-o", str(tmp_path / "x.png")] if action == "plot" else []
    rc, out, err = _run(capsys, "schedule", action, "--lr", "0.1", "--spec", spec, *extra)
    assert rc == 2
    assert out == ""
    assert err.startswith(f"optserve schedule {action}: ")
    assert words in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--lr", "nan"], "--lr: must be a finite number >= 0"),
        (["--lr", "fast"], "--lr: not a number"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    base = {"--lr": "0.1", "--spec": STEP}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = [part for pair in base.items() for part in pair]
    with pytest.raises(SystemExit) as info:
        main(["schedule", "preview", *args])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_current_step_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run(
        capsys,
        "schedule",
        "plot",
        "--lr",
        "0.1",
        "--spec",
        STEP,
        "--steps",
        "10",
        "--current-step",
        "10",
        "-o",
        str(tmp_path / "x.png"),
    )
    assert rc == 2
    assert "--current-step must be in [0, 10)" in err


def test_schedule_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["schedule"])
    assert info.value.code == 2


def test_existing_commands_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "optimizers")
    assert rc == 0
    assert "sgd" in out
    rc, out, _ = _run(
        capsys, "demo", "--optimizer", "sgd", "--hyper", '{"lr": 0.01}', "--steps", "3"
    )
    assert rc == 0
    assert "loss" in out


def test_schedule_png_refuses_bad_ranges() -> None:
    pytest.importorskip("matplotlib")
    from service.core.errors import CoreError
    from service.core.plots import schedule_png

    schedule = parse_schedule(json.loads(STEP))
    with pytest.raises(CoreError, match="steps must be >= 1"):
        schedule_png(schedule, 0.1, 0)
    with pytest.raises(CoreError, match=r"current_step must be in \[0, 5\)"):
        schedule_png(schedule, 0.1, 5, current_step=5)
    assert _png_size(schedule_png(schedule, 0.1, 1, current_step=0)) == (800, 500)
