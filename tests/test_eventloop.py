"""The `dispatch` commands' event loop (eventloop.py): uvloop unless told otherwise."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from dispatchnet import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)],
)
def test_the_setting_chooses_the_loop(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: type
) -> None:
    monkeypatch.setenv(eventloop.ENV, setting)
    loop_type = eventloop.run(_loop_type())
    assert issubclass(loop_type, expected)
    assert setting == "asyncio" or not issubclass(loop_type, asyncio.SelectorEventLoop)


def test_an_unknown_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    with pytest.raises(ValueError, match="DISPATCH_EVENT_LOOP must be uvloop or asyncio"):
        eventloop.run(_loop_type())


def test_the_cli_reports_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispatchnet import cli

    monkeypatch.setenv(eventloop.ENV, "nonsense")
    assert cli.main(["auth", "header"]) == 1
    assert "DISPATCH_EVENT_LOOP must be uvloop or asyncio" in capsys.readouterr().err
