"""The `dispatch` commands' event loop (eventloop.py): asyncio's unless told uvloop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from dispatchnet import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", asyncio.SelectorEventLoop),
        ("asyncio", asyncio.SelectorEventLoop),
        ("uvloop", uvloop.Loop),
    ],
)
def test_the_setting_chooses_the_loop(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: type
) -> None:
    monkeypatch.setenv(eventloop.ENV, setting)
    loop_type = eventloop.run(_loop_type())
    assert issubclass(loop_type, expected)
    assert (setting == "uvloop") == issubclass(loop_type, uvloop.Loop)


def test_an_unknown_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    with pytest.raises(ValueError, match="DISPATCH_EVENT_LOOP must be asyncio or uvloop"):
        eventloop.run(_loop_type())


def test_the_cli_reports_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispatchnet import cli

    monkeypatch.setenv(eventloop.ENV, "nonsense")
    assert cli.main(["auth", "header"]) == 1
    assert "DISPATCH_EVENT_LOOP must be asyncio or uvloop" in capsys.readouterr().err
