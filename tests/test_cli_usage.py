"""The `dispatch` command's usage: what it refuses (exit 2, naming the option), what it
reads (--profile, DISPATCH_LOG_FORMAT, key files) and what it says when it fails.

Parser and local checks run the CLI in-process (cli.main); runs against a coordinator are
subprocesses (test_cli.run), so that the coordinator keeps serving in the test's loop.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from chain_fixtures import chain, chain_profile, cluster_for, home  # noqa: F401
from conftest import Cluster
from test_cli import cli_env, failed, ok_json, run

from dispatchnet import cli, keys
from dispatchnet.auth.tokens import verify_header
from dispatchnet.profiles import AuthConfig

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every in-process run gets its own DISPATCH_HOME and no inherited settings."""
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path / "home"))
    for name in ("DISPATCH_COORDINATOR", "DISPATCH_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """stderr of a run that argparse refuses (exit 2, nothing run)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    assert exited.value.code == 2, exited.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def cluster_profile(tmp_path: Path, *addresses: str) -> str:
    path = tmp_path / "clustered.toml"
    path.write_text(f"[cluster]\ncoordinators = {json.dumps(list(addresses))}\n")
    return str(path)


# --- 1. --profile on every command that talks to a coordinator -----------------------------

COORDINATOR_COMMANDS = [
    ("job", "get", "J"),
    ("job", "watch", "J"),
    ("job", "cancel", "J"),
    ("pair", "create"),
    ("pair", "claim", "CODE"),
    ("pair", "list"),
    ("pair", "revoke", "P"),
    ("receipt", "proof", "J"),
    ("workers",),
]


@pytest.mark.parametrize("command", COORDINATOR_COMMANDS, ids=" ".join)
def test_coordinator_commands_find_coordinators_in_the_profile(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    profile = cluster_profile(tmp_path, "10.0.0.1:50051", "10.0.0.2:50051")
    args = cli.build_parser().parse_args([*command, "--profile", profile])
    cli.resolve_coordinator(args)
    assert args.coordinator == "10.0.0.1:50051,10.0.0.2:50051"


async def test_workers_and_pairing_through_the_profile(cluster: Cluster, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    w = await cluster.worker()
    profile = ("--profile", cluster_profile(tmp_path, cluster.address))
    listed = ok_json(await run("workers", *profile, env=env))
    assert [x["worker_id"] for x in listed] == [w.key.public_hex]
    code = ok_json(await run("pair", "create", *profile, env=env))
    assert code["code"]
    assert ok_json(await run("pair", "list", *profile, env=env)) == []


# --- 2-4. numbers are checked by argparse: exit 2, the option named -------------------------

REFUSED = [
    (("job", "submit", "--prompt", "hi", "--max-tokens", "-1"), "--max-tokens"),
    (("job", "submit", "--prompt", "hi", "--max-tokens", str(2**32)), "--max-tokens"),
    (("job", "submit", "--prompt", "hi", "--temperature", "2.5"), "--temperature"),
    (("job", "submit", "--prompt", "hi", "--temperature", "nan"), "--temperature"),
    (("job", "submit", "--task", "echo", "--max-payment", "-1"), "--max-payment"),
    (("job", "watch", "J", "--after", "-1"), "--after"),
    (("pair", "create", "--ttl", "-5"), "--ttl"),
    (("pair", "create", "--ttl", "86401"), "--ttl"),
    (("worker", "earnings", "--page-size", "500"), "--page-size"),
    (("worker", "earnings", "--page-size", "-1"), "--page-size"),
    (("worker", "--max-concurrency", "0"), "--max-concurrency"),
    (("worker", "--max-concurrency", "65"), "--max-concurrency"),
    (("worker", "--lie-rate", "2"), "--lie-rate"),
    (("worker", "--drain-timeout", "-1"), "--drain-timeout"),
    (("seekers", "--count", "1", "--max-concurrency", "0"), "--max-concurrency"),
    (("seekers", "--count", "0"), "--count"),
    (("seekers", "--count", "1", "--lie-rate", "-0.1"), "--lie-rate"),
    (("seekers", "--count", "1", "--flaky", "1.5"), "--flaky"),
    (("seekers", "--count", "1", "--slow", "0.5"), "--slow"),
    (("seekers", "--count", "1", "--drain-timeout", "inf"), "--drain-timeout"),
    (("gateway", "--max-price-micros", "-1"), "--max-price-micros"),
    (("gateway", "--hosted-budget-micros", "-1"), "--hosted-budget-micros"),
    (("gateway", "--max-body-bytes", "0"), "--max-body-bytes"),
    (("gateway", "--max-concurrent", "0"), "--max-concurrent"),
    (("cluster", "up", "--coordinators", "17"), "--coordinators"),
    (("chain", "up", "--port", "65536"), "--port"),
    (("wallet", "pay", "X", "--max-payment", "-1"), "--max-payment"),
    (("mcp", "--max-payment", "-1"), "--max-payment"),
    (("mcp", "--budget", "-1"), "--budget"),
    (("auth", "header", "--ttl", "0"), "--ttl"),
    (("auth", "header", "--ttl", "-60"), "--ttl"),
    (("auth", "header", "--ttl", "999999999"), "--ttl"),
    (("chain", "reputation", "-1"), "agent_id"),
    (("chain", "reputation", str(2**256)), "agent_id"),
    (("bench", "--seconds", "0"), "--seconds"),
    (("bench", "--seconds", "nan"), "--seconds"),
    (("bench", "--submitters", "0"), "--submitters"),
    (("bench", "--seekers", "50"), "--seekers"),
    (("bench", "--most-seekers", "1000001"), "--most-seekers"),
]


@pytest.mark.parametrize(("argv", "option"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_numbers_out_of_range_are_usage_errors(
    argv: tuple[str, ...], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(capsys, *argv)
    assert f"argument {option}: must be " in err, err
    assert "Value out of range" not in err


def test_bounds_themselves_are_accepted() -> None:
    parse = cli.build_parser().parse_args
    assert parse(["worker", "earnings", "--page-size", "100"]).page_size == 100
    assert parse(["pair", "create", "--ttl", "86400"]).ttl == 86400
    assert parse(["job", "submit", "--prompt", "x", "--max-tokens", "0"]).max_tokens == 0
    assert parse(["worker", "--max-concurrency", "64", "--lie-rate", "1"]).lie_rate == 1.0
    assert parse(["seekers", "--count", "1", "--flaky", "0", "--slow", "1"]).slow == 1.0


def test_auth_header_ttl_is_what_coordinators_accept(capsys: pytest.CaptureFixture[str]) -> None:
    limit = AuthConfig().max_token_ttl_seconds
    assert cli.main(["auth", "header", "--raw", "--ttl", str(limit)]) == 0
    value = capsys.readouterr().out.strip()
    verify_header(value, limit)  # a coordinator with the default [auth] takes it
    err = usage_error(capsys, "auth", "header", "--ttl", str(limit + 1))
    assert f"between 1 and {limit}" in err


# --- 5. DISPATCH_LOG_FORMAT is checked like --log-format ----------------------------------


def test_a_bad_log_format_in_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "invalid choice" in usage_error(capsys, "--log-format", "bogus", "auth", "whoami")
    monkeypatch.setenv("DISPATCH_LOG_FORMAT", "bogus")
    err = usage_error(capsys, "auth", "whoami")
    assert "DISPATCH_LOG_FORMAT must be human or json, not 'bogus'" in err
    # the option wins over the environment
    assert cli.main(["--log-format", "human", "auth", "whoami"]) == 0
    monkeypatch.setenv("DISPATCH_LOG_FORMAT", " JSON ")
    assert cli.main(["auth", "whoami"]) == 0


# --- 6. a key file that is not there is not created where a new key owns nothing -----------

NEEDS_A_KEY = [
    (("pair", "claim", "CODE"), "worker"),
    (("worker", "earnings"), "worker"),
    (("job", "get", "J"), "client"),
    (("job", "watch", "J"), "client"),
    (("job", "cancel", "J"), "client"),
    (("receipt", "proof", "J"), "client"),
    (("pair", "list"), "client"),
    (("pair", "revoke", "P"), "client"),
]


@pytest.mark.parametrize(("argv", "who"), NEEDS_A_KEY, ids=[" ".join(a) for a, _ in NEEDS_A_KEY])
def test_commands_acting_as_an_identity_need_its_key_file(
    argv: tuple[str, ...], who: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "nonexistent" / "dir" / f"{who}.key"
    unreachable = ("--coordinator", "127.0.0.1:1")  # never asked: refused before
    assert cli.main([*argv, *unreachable, "--key-file", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"error: no {who} key file at {typo}" in err
    assert not (tmp_path / "nonexistent").exists()
    # the default key under DISPATCH_HOME is not made either
    assert cli.main([*argv, *unreachable]) == 2
    assert f"no {who} key file" in capsys.readouterr().err
    assert not (tmp_path / "home" / f"{who}.key").exists()


def test_a_client_key_is_still_made_on_first_use(tmp_path: Path) -> None:
    new = tmp_path / "new" / "client.key"
    assert cli.main(["auth", "header", "--key-file", str(new)]) == 0
    assert keys.load(new).public_hex


# --- 7. paying: what a paid coordinator accepts, and no `chain up` where there is no chain ---


async def test_a_paid_coordinator_says_what_it_accepts_with_and_without_wait(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    profile = chain_profile(str(home / "chains" / "local-monad.json"), payments={})
    env = cli_env(tmp_path / "cli-home")  # --profile local: no wallet
    async with cluster_for(profile, tmp_path / "coord") as paid:
        submit = ("job", "submit", "--coordinator", paid.address, "--task", "sha256")
        without = failed(await run(*submit, "--input", '"hello"', env=env))
        waited = failed(await run(*submit, "--input", '"hello"', "--wait", env=env))
    for err in (without, waited):
        assert err.startswith("error: RESOURCE_EXHAUSTED: "), err
        assert "accepted:" in err and "atomic units of" in err, err
        assert "--profile <profile with a [wallet]>` or --wallet-key FILE" in err, err
    accepted = re.findall(r"^  \d+ atomic units of .*$", without, re.M)
    assert accepted and accepted == re.findall(r"^  \d+ atomic units of .*$", waited, re.M)


def test_no_wallet_hints_name_chain_up_only_for_a_local_chain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in (["wallet", "balance"], ["wallet", "pay", "X"], ["wallet", "address"]):
        assert cli.main([*command, "--profile", "local"]) == 1
        err = capsys.readouterr().err
        assert "profile local has no chain to pay on" in err and "chain up" not in err, err
    # local-monad has a local chain (not started in this DISPATCH_HOME)
    assert cli.main(["wallet", "balance", "--profile", "local-monad"]) == 1
    assert "`dispatch chain up --profile local-monad`" in capsys.readouterr().err


# --- 8. help and README agree with the parser ---------------------------------------------


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def readme_row(command: str) -> str:
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| `{command}")]
    assert len(rows) == 1, rows
    return rows[0]


def test_help_and_readme_describe_demo_and_chain(capsys: pytest.CaptureFixture[str]) -> None:
    top = help_of(capsys)
    assert "both chain tracks" in top and "on a local coordinator" not in top
    assert "a local EVM chain" not in top and "Solana" in top
    assert "--cluster" in readme_row("dispatch demo")
    chain_row = readme_row("dispatch chain up")
    assert "status [--profile P] [--port N]" not in chain_row and "up [--port N]" in chain_row
    assert "--port" in help_of(capsys, "chain", "up")
    for sub in ("down", "status"):
        assert "--port" not in help_of(capsys, "chain", sub)


# --- 9. a busy port is named ---------------------------------------------------------------


@pytest.mark.parametrize("command", [("gateway",), ("mcp", "--transport", "http")], ids=" ".join)
async def test_a_busy_listen_address_is_named(command: tuple[str, ...], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = await run(*command, "--listen", address, env=cli_env(tmp_path / "home"))
    err = failed(result)
    assert f"error: cannot listen on {address}: Address already in use" in err, err


async def test_a_coordinator_on_a_busy_or_malformed_address_says_so(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = await run("coordinator", "--profile", "local", "--listen", address, env=env)
    err = failed(result)
    assert f"error: cannot listen on {address}: the port is in use" in err, err
    err = failed(await run("coordinator", "--listen", "nonsense", env=env), code=2)
    assert "--listen must be HOST:PORT, not 'nonsense'" in err, err
