"""`dispatch demo`: the whole network on this machine, end to end, on two local chains.

The same steps run once per track (TRACKS: the EVM track on local-monad's anvil, the Solana
track on local-solana's LiteSVM node), one coordinator per chain: `dispatch chain up
--profile <track> --port 0` starts the chain, a coordinator on that profile (receipt batches
close after 2 s and are anchored on the chain) listens on its own free port with its own
data dir, and two seekers and a desktop connect to it as subprocesses, registered first with
`dispatch worker register` as ERC-8004 agents (on the Solana track on its identity chain,
with a Solana key named in the registration, where they are paid). On the EVM track
reputation is read from the chain and the coordinator's feedback is shown on chain; the
Solana track's workers are rated on the same identity chain, which the demo does not show
again ("reputation: rated on the identity chain, shown on the EVM track"). A client
then plays the seed's three scenarios on each chain: a public FAST LLM job run by the
desktop's embedded model (tokens streamed live), a public CHEAP task and a PRIVATE task that
only the worker the client paired with may run. Every job is paid for with x402 from the
deployment's funded "client" account in test USDC (EVM: an EIP-3009 authorization, settled
once the job completes; Solana: an SPL transfer settled at commit, "held" until the job
completes). Once the coordinator's payout loop has paid every worker that has a payout
address (a worker without one would have its share shown from GetEarnings as not yet paid),
the test USDC of the payer, the coordinator and each worker's payout address is read on
chain before and after, with the settlement and payout transactions, and must add up
exactly: payer paid = fees kept + shares paid + shares not yet paid. On the EVM track a
fourth registered worker then connects with `--lie-rate 1` (it returns wrong, properly
signed output) and a verify=3 word_count runs through the SDK (again, at most LIAR_TRIES
times, until the liar is among the three workers picked): the liar is outvoted, the client
gets the right answer, the receipt's verification record is checked, the agreeing workers
split the share, and the liar's spotCheck 0 feedback is read back from the chain with its
score before and after. Every receipt is checked in-process and with `dispatch receipt
verify`, and one receipt per chain on chain (`dispatch receipt proof` + `receipt verify
--onchain`). A summary table has a row per job per chain. Everything, the chains
included, lives in a temporary directory ($DISPATCH_HOME for the children) that is
removed at the end; each track's processes are stopped and its chain brought down
(`dispatch chain down`) before the next track starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2
from dispatchnet import keys
from dispatchnet.chains import registry
from dispatchnet.chains.deployments import CHAINS_DIR
from dispatchnet.cli import job_json
from dispatchnet.client import CoordinatorClient, llm_spec, task_spec
from dispatchnet.profiles import Profile, load_profile, resolve_path
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.sdk import ComputeRouter, ModelPrice, Network, OpenAIProvider
from dispatchnet.sdk import DispatchError as SdkError
from dispatchnet.sdk import types as sdk_types
from dispatchnet.sdk.convert import to_pb, to_types
from dispatchnet.worker.llm import shipped_model_path
from dispatchnet.worker.tasks import run_task

START_TIMEOUT = 20.0
CONNECT_TIMEOUT = 20.0
JOB_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
# Each track's coordinator runs its profile with receipt batches closing after this many
# seconds (instead of 10), so the receipts are anchored quickly.
BATCH_MAX_AGE = 2
FEEDBACK_TIMEOUT = 30.0
PROOF_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
# The payout loop pays a balance [payouts] interval_seconds (10 s on local profiles) after
# its oldest credit; the demo waits at most this long for every payout to land.
PAYOUT_TIMEOUT = 45.0
INDENT = "      "
STEPS = 11  # per track
# The lying worker's step (EVM): a verify=3 job repeated until the liar is among the three
# workers matching picks (weighted random), at most this many times.
LIAR_TRIES = 4
LIAR = "liar"
NO_REPUTATION = "reputation: rated on the identity chain, shown on the EVM track"

# The hosted provider of the SDK's fallback, played by llama.cpp's OpenAI-compatible server
# with the shipped model (no hosted provider is reachable here): its model name and the
# price the demo's price table gives it (micro-USD per million input and output tokens).
HOSTED_MODEL = "smollm2-local"
HOSTED_PRICE = ModelPrice(150_000, 600_000)
HOSTED_START_TIMEOUT = 90.0

_KIND_NAMES = {common_pb2.WORKER_KIND_SEEKER: "seeker", common_pb2.WORKER_KIND_DESKTOP: "desktop"}


@dataclass(frozen=True)
class Track:
    """One chain the demo plays the scenarios on. Only these fields differ between tracks:
    the steps are the same code (the chain itself is reached through the registry's
    adapter for the profile's [chain] kind)."""

    name: str  # the summary's Chain column
    profile: str  # `dispatch chain up --profile …` and the coordinator's profile
    node: str  # what `dispatch chain up` starts
    pid_field: str  # the deployment file's record of the node's pid
    agents: bool  # workers are ERC-8004 agents: registered, rated on chain, fed back to
    settles_at_commit: bool  # the x402 payment moves at commit ("held" until the job ends)
    # workers registered as ERC-8004 agents (so the payout loop pays them) without the
    # reputation steps: on Solana, on the profile's [identity_chain], naming their Solana key
    registers: bool = False


TRACKS = (
    Track("EVM", "local-monad", "anvil", "anvil_pid", agents=True, settles_at_commit=False),
    Track(
        "Solana",
        "local-solana",
        "a LiteSVM node",
        "node_pid",
        agents=False,  # no reputation steps on Solana yet
        settles_at_commit=True,
        registers=True,
    ),
)


class DemoError(Exception):
    """A step of the demo could not go on."""


@dataclass(frozen=True)
class Client:
    """The demo's client side: the SDK's router for jobs, and a coordinator client for
    what the SDK does not do (pairing codes, following a payment to settlement)."""

    router: ComputeRouter
    coordinator: CoordinatorClient


@dataclass
class Child:
    """A subprocess the demo started, with the file its stderr goes to."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]


@dataclass
class WorkerInfo:
    label: str
    kind: str
    key_file: Path
    worker_id: str = ""
    agent_id: str = ""
    payout_address: str = ""  # where the coordinator pays it, read on chain ("" = nowhere)


@dataclass
class Outcome:
    """What one scenario produced on one chain and whether it checked out."""

    chain: str
    title: str
    job: coordinator_pb2.Job | None = None
    worker: str = "-"  # who ran it, as the demo names its workers
    receipt_valid: bool = False
    problems: list[str] = field(default_factory=list)
    hosted: str = ""  # the hosted route's output, when the SDK fell back (no job)

    @property
    def ok(self) -> bool:
        if self.hosted:
            return not self.problems
        return (
            self.job is not None
            and self.job.state == coordinator_pb2.JOB_STATE_COMPLETED
            and self.job.payment.status == "settled"
            and self.receipt_valid
            and not self.problems
        )


def say(text: str = "") -> None:
    print(text, flush=True)


def short(hex_id: str) -> str:
    return hex_id[:8]


def usdc(atomic: int, decimals: int = 6) -> str:
    """Test USDC atomic units as an amount."""
    return f"{atomic / 10**decimals:,.6f} USDC"


def usd(micros: int) -> str:
    """Micro-USD as dollars with as many decimals as needed (at least two)."""
    whole, _, frac = f"{micros / 1_000_000:.6f}".partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"


def state_name(state: coordinator_pb2.JobState.ValueType) -> str:
    return coordinator_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def output_text(job: coordinator_pb2.Job, limit: int = 70) -> str:
    """The job's output as `dispatch job get` decodes it, on one line."""
    data = job_json(job)
    if "output_decoded" in data:
        value = data["output_decoded"]
        text = value if isinstance(value, str) else json.dumps(value)
    elif job.HasField("result"):
        text = f"<{len(job.result.output)} bytes of {job.result.content_type or 'binary'}>"
    else:
        text = "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _problem(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)


# What a step may fail with and still let the demo go on to the next step.
STEP_ERRORS = (DemoError, OSError, ValueError, grpc.aio.AioRpcError)


class Processes:
    """The `dispatch` subprocesses of one track: started in its directory with the demo's
    environment, stopped together (workers first)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.children: list[Child] = []

    def cli_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dispatchnet.cli", *args]

    async def spawn(self, name: str, *args: str) -> dict[str, Any]:
        """Starts a long-running `dispatch` command and reads the JSON line it prints first."""
        log_path = self.workdir / f"{name}.log"
        log_file = _open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cli_args(*args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=self.env,
                cwd=self.workdir,
            )
        except BaseException:
            log_file.close()
            raise
        self.children.append(Child(name, proc, log_path, log_file))
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            raise DemoError(f"{name} printed nothing within {START_TIMEOUT:.0f}s") from None
        if not line:
            await proc.wait()
            raise DemoError(f"{name} exited with code {proc.returncode} before starting")
        try:
            info = json.loads(line)
        except ValueError:
            raise DemoError(f"{name} printed {line!r} instead of its JSON status line") from None
        if not isinstance(info, dict):
            raise DemoError(f"{name} printed {line!r} instead of its JSON status line")
        return info

    async def run(self, *args: str) -> tuple[int, str, str]:
        """Runs a short `dispatch` command to completion: (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.cli_args(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=self.workdir,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DemoError(
                f"`dispatch {args[0]}` did not finish in {COMMAND_TIMEOUT:.0f}s"
            ) from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def stop_all(self) -> None:
        """SIGTERM to everything still running (workers first), then kill what lingers;
        idempotent."""
        workers = [c for c in self.children if not c.name.startswith("coordinator")]
        coordinator = [c for c in self.children if c.name.startswith("coordinator")]
        for group in (workers, coordinator):
            await asyncio.gather(*(self._stop(c) for c in group))
        for c in self.children:
            c.log_file.close()

    async def _stop(self, child: Child) -> None:
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def print_logs(self, prefix: str) -> None:
        for c in self.children:
            lines = _tail(c.log_path)
            if lines:
                print(f"--- last lines of {prefix} {c.name}'s log ---", file=sys.stderr)
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()


class HostedStandIn:
    """llama.cpp's OpenAI-compatible server with the shipped model, on a free port: the
    hosted provider of the SDK's fallback in the demo (OpenAI cannot be reached here)."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = tmp / "llama-server.log"
        self.log_file = _open_log(self.log_path)
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(shipped_model_path())]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024"]
        argv += ["--model_alias", HOSTED_MODEL]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log_file,
            env=env,
        )  # fmt: skip

    async def ready(self) -> OpenAIProvider:
        """Waits until the server lists its model; the SDK's provider for it."""
        deadline = time.monotonic() + HOSTED_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                tail = "\n".join(_tail(self.log_path))
                raise DemoError(f"llama.cpp's server exited ({self.proc.returncode}): {tail}")
            try:
                await asyncio.to_thread(self._models)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoError("llama.cpp's server did not answer /v1/models") from None
                await asyncio.sleep(POLL_INTERVAL)  # polling a server's readiness
        return OpenAIProvider(api_key="local", base_url=self.url, model=HOSTED_MODEL)

    def _models(self) -> None:
        with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
            json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# how long each track's dashboard stays up after its last step (without --keep-open)
LINGER_SECONDS = 5.0


class TrackRun:
    """One track played end to end: its chain, coordinator, workers, scenarios and checks.
    Steps record what went wrong (self.problems, each outcome's problems) and go on."""

    def __init__(
        self, track: Track, tmp: Path, env: dict[str, str], client_key: keys.KeyPair
    ) -> None:
        self.track = track
        self.home = Path(env["DISPATCH_HOME"])
        self.dir = tmp / track.profile
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.dir, env)
        self.client_key = client_key
        self.client_key_file = tmp / "client.key"
        self.coordinator_profile = self.dir / f"{track.profile}-demo.toml"
        self.chain: dict[str, Any] = {}  # the deployment file `dispatch chain up` printed
        self.profile: Profile | None = None  # the coordinator's, read in this process
        self.address = ""
        self.coordinator_key = b""
        # a cluster's other coordinators' keys: receipts countersigned by any of them pass
        self.cluster_keys: list[bytes] = []
        self.workers = [
            WorkerInfo("seeker-1", "seeker", self.dir / "seeker-1.key"),
            WorkerInfo("seeker-2", "seeker", self.dir / "seeker-2.key"),
            WorkerInfo("desktop-1", "desktop", self.dir / "desktop-1.key"),
        ]
        # a worker started with --lie-rate 1 for the verification step (agents only):
        # registered with the others, connected only for that step
        self.liar = WorkerInfo(LIAR, "seeker", self.dir / "liar.key") if track.agents else None
        self.outcomes: list[Outcome] = []
        self.problems: list[str] = []  # the chain-wide checks' (payments, reputation, anchor)
        self.wallet: Any = None
        self.asset: Any = None  # the wallet's payment asset: the deployment's test USDC
        self.before: dict[str, int] = {}  # test USDC per address before the first job
        self.stopped = False
        self.hosted: OpenAIProvider | None = None  # the SDK's fallback (set by run_demo)
        self.dashboard = ""  # the coordinator's dashboard, with its token (README "Observability")
        self.keep_open = False  # at the end, wait for Enter with the dashboard up (set by run_demo)

    @property
    def ok(self) -> bool:
        # (a setup step that failed is in self.problems, and no scenario ran)
        return bool(self.outcomes) and all(o.ok for o in self.outcomes) and not self.problems

    def step(self, n: int, text: str) -> None:
        say(f"\n[{self.track.name} {n}/{STEPS}] {text}")

    def failed(self, e: BaseException, into: list[str]) -> None:
        into.append(_problem(e))
        say(f"{INDENT}FAILED: {_problem(e)}")

    def label(self, worker_id: str) -> str:
        for w in self.all_workers:
            if w.worker_id == worker_id:
                return f"{w.label} ({short(worker_id)})"
        return short(worker_id) if worker_id else "-"

    @property
    def all_workers(self) -> list[WorkerInfo]:
        """The workers, and the liar (agents only)."""
        return self.workers + ([self.liar] if self.liar is not None else [])

    def amount(self, atomic: int) -> str:
        return usdc(atomic, self.asset.decimals if self.asset is not None else 6)

    # --- the track's steps -------------------------------------------------------------------

    async def play(self) -> None:
        """Every step of the track, then its processes and chain stopped."""
        t = self.track
        say(f"\n=== {t.name} track: profile {t.profile}, one coordinator on {t.node} ===")
        try:
            try:
                self.step(1, f"Starting the local chain ({t.node})")
                await self.chain_up()
                self.step(2, f"Starting a coordinator on {t.profile}")
                await self.start_coordinator()
                if t.agents:
                    self.step(
                        3, "Registering the workers as ERC-8004 agents (and a liar for step 10)"
                    )
                    await self.register_workers()
                elif t.registers:
                    self.step(
                        3,
                        "Registering the workers as ERC-8004 agents on the identity chain, "
                        f"their Solana keys named in the registration ({NO_REPUTATION})",
                    )
                    await self.register_workers()
                else:
                    self.step(3, f"Workers connect unregistered ({NO_REPUTATION})")
                self.step(4, "Starting workers: 2 seekers (phones) and 1 desktop")
                await self.start_workers()
                await self.open_wallet()
            except STEP_ERRORS as e:
                self.failed(e, self.problems)
                return
            await self.play_scenarios()
            self.step(8, "Payments and payouts: test USDC on chain, before and after")
            try:
                await self.show_payments()
            except STEP_ERRORS as e:
                self.failed(e, self.problems)
            if t.agents:
                self.step(9, "Reputation after the coordinator's on-chain feedback")
                try:
                    await self.reputation_after()
                except STEP_ERRORS as e:
                    self.failed(e, self.problems)
            else:
                self.step(9, f"Reputation ({NO_REPUTATION})")
            if self.liar is not None:
                self.step(10, "A lying worker: outvoted by a verify=3 job, rated down on chain")
                try:
                    await self.catch_a_liar(self.liar)
                except STEP_ERRORS as e:
                    self.failed(e, self.problems)
            else:
                self.step(10, "A lying worker outvoted (shown on the EVM track)")
            self.step(11, "A receipt checked on chain (its batch root is anchored)")
            anchored = next((o.job for o in self.outcomes if o.ok and o.job is not None), None)
            try:
                if anchored is None:
                    raise DemoError("no completed job to check")
                await self.verify_onchain(anchored)
            except STEP_ERRORS as e:
                self.failed(e, self.problems)
            await self.linger()
        finally:
            if not self.ok:
                self.procs.print_logs(t.name)
            await self.stop()

    async def linger(self) -> None:
        """The dashboard stays up a moment after the last step (with --keep-open: until
        Enter, or the end of standard input)."""
        if not self.dashboard:
            return
        if self.keep_open:
            say(f"{INDENT}the dashboard stays up at {self.dashboard}: press Enter to go on")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            return
        say(f"{INDENT}the dashboard stays up {LINGER_SECONDS:g}s more (`dispatch demo "
            "--keep-open` keeps it until Enter)")  # fmt: skip
        await asyncio.sleep(LINGER_SECONDS)

    async def stop(self) -> None:
        """Stops the track's processes, then its chain; idempotent."""
        if self.stopped:
            return
        self.stopped = True
        await self.procs.stop_all()
        await self.chain_down()

    # --- the chain -----------------------------------------------------------------------------

    def write_coordinator_profile(self) -> None:
        """The track's profile with short receipt batches (and, for agents, reputation read
        from the chain)."""
        text = resolve_path(self.track.profile).read_text()
        changes = [("batch_max_age_seconds = 10", f"batch_max_age_seconds = {BATCH_MAX_AGE}")]
        if self.track.agents:
            changes.append(('[reputation]\nsource = "local"', '[reputation]\nsource = "erc8004"'))
        for old, new in changes:
            if old not in text:
                raise DemoError(f"profile {self.track.profile} has no `{old}` to adjust")
            text = text.replace(old, new)
        self.coordinator_profile.write_text(text)
        profile = load_profile(str(self.coordinator_profile))
        needs = {"anchor", "payments"} | ({"identity", "feedback"} if self.track.agents else set())
        missing = needs - registry.capabilities(profile.chain.kind)
        if missing:
            raise DemoError(f"[chain] kind {profile.chain.kind} lacks {', '.join(sorted(missing))}")

        # read in this process, whose $DISPATCH_HOME is not the demo's: the files by path
        def by_path(chain: Any) -> Any:
            if not chain.deployment:
                return chain
            path = self.home / CHAINS_DIR / f"{chain.deployment}.json"
            return dataclasses.replace(chain, deployment=str(path))

        self.profile = dataclasses.replace(
            profile,
            chain=by_path(profile.chain),
            identity_chain=by_path(profile.identity_chain),
        )

    def adapter(self) -> tuple[registry.ChainAdapter, Profile]:
        if self.profile is None:
            raise DemoError("the chain is not up")
        return registry.adapter_of(self.profile), self.profile

    async def chain_up(self) -> None:
        p = self.track.profile
        code, out, err = await self.procs.run("chain", "up", "--profile", p, "--port", "0")
        if code != 0:
            raise DemoError(f"`dispatch chain up` exited {code}: {(err or out).strip()[-300:]}")
        self.chain = json.loads(out)
        say(
            f"{INDENT}`dispatch chain up --profile {p} --port 0`: {self.track.node} at "
            f"{self.chain.get('rpc_url')} ({self.chain.get('network')}, pid "
            f"{self.chain.get(self.track.pid_field)})"
        )
        deployed = dict(self.chain.get("contracts") or {})
        usdc_info = self.chain.get("usdc")
        if isinstance(usdc_info, dict) and usdc_info.get("mint"):
            deployed["test USDC mint"] = usdc_info["mint"]
        for n, (name, address) in enumerate(deployed.items()):
            say(f"{INDENT}{'deployed' if n == 0 else '':9}{name:<22}{address}")
        self.write_coordinator_profile()

    async def chain_down(self) -> None:
        """`dispatch chain down`; kills the recorded node itself if that command fails."""
        if not self.chain:
            return
        pid = int(self.chain.get(self.track.pid_field) or 0)
        what = f"{self.track.node} (pid {pid})"
        try:
            code, out, err = await self.procs.run("chain", "down", "--profile", self.track.profile)
        except DemoError as e:
            code, out, err = 1, "", str(e)
        if code == 0:
            try:
                stopped = json.loads(out).get("stopped") is True
            except (ValueError, AttributeError):
                stopped = False
            state = "stopped" if stopped else f"not running any more ({out.strip()[-200:]})"
            say(f"`dispatch chain down --profile {self.track.profile}`: {what} {state}")
            return
        from dispatchnet.devchain.local_chain import stop_pid

        await asyncio.to_thread(stop_pid, pid)
        say(f"`dispatch chain down` exited {code} ({(err or out).strip()[-200:]}); {what} killed")

    # --- coordinator and workers ---------------------------------------------------------------

    async def start_coordinator(self) -> None:
        info = await self.procs.spawn(
            "coordinator",
            "coordinator",
            "--profile",
            str(self.coordinator_profile),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.dir / "coordinator"),
        )
        try:
            self.address = str(info["listening"])
            self.coordinator_key = bytes.fromhex(str(info["coordinator_public_key"]))
        except (KeyError, ValueError) as e:
            raise DemoError(f"the coordinator's status line lacks {e}: {info}") from None
        say(f"{INDENT}listening on {self.address} (profile {info.get('profile', '?')})")
        say(f"{INDENT}coordinator key {self.coordinator_key.hex()[:16]}...  (signs every receipt)")
        say(f"{INDENT}anchoring {info.get('anchoring', '?')}")
        if info.get("dashboard"):
            token_file = Path(str(info.get("dashboard_token_file", "")))
            token = token_file.read_text().strip() if token_file.is_file() else ""
            self.dashboard = (
                f"{info['dashboard']}#token={token}" if token else str(info["dashboard"])
            )
            say(f"{INDENT}operator dashboard (live, read-only): {self.dashboard}")
        if info.get("metrics"):
            say(f"{INDENT}Prometheus metrics: {info['metrics']}")
        say(
            f"{INDENT}receipt batches close after {BATCH_MAX_AGE}s; "
            + (
                "reputation source: erc8004 (read from the chain)"
                if self.track.agents
                else NO_REPUTATION
            )
        )

    async def register_workers(self) -> None:
        """`dispatch worker register` for every worker at once (each its own account)."""
        results = await asyncio.gather(*(self.register(w) for w in self.all_workers))
        for w, result in zip(self.all_workers, results, strict=True):
            solana = f"  solana {result['solana']}" if result.get("solana") else ""
            role = "  (started with --lie-rate 1 in step 10)" if w is self.liar else ""
            say(
                f"{INDENT}{w.label:<10} agent #{w.agent_id}  owner {result.get('chain_address')}"
                f"{solana}  tx {str(result.get('tx', ''))[:18]}...{role}"
            )
        say(
            f"{INDENT}(`dispatch worker register --profile {self.track.profile} --key-file "
            "<worker key>`; each worker proves its agent on Connect)"
        )

    async def register(self, w: WorkerInfo) -> dict[str, Any]:
        code, out, err = await self.procs.run(
            "worker",
            "register",
            "--profile",
            self.track.profile,
            "--key-file",
            str(w.key_file),
            "--name",
            f"dispatch-demo-{w.label}",
            "--endpoint",
            self.address,
        )
        if code != 0:
            raise DemoError(
                f"`dispatch worker register` ({w.label}) exited {code}: "
                f"{(err or out).strip()[-300:]}"
            )
        result: dict[str, Any] = json.loads(out)
        w.agent_id = str(result.get("agent_id", ""))
        if not w.agent_id:
            raise DemoError(f"`dispatch worker register` printed no agent id: {result}")
        return result

    async def list_workers(self) -> dict[str, coordinator_pb2.WorkerInfo]:
        """The connected workers by id (ListWorkers; each coordinator lists its own)."""
        found: dict[str, coordinator_pb2.WorkerInfo] = {}
        for address in self.address.split(","):
            async with CoordinatorClient(address, keys.KeyPair.generate()) as c:
                try:
                    found |= {w.worker_id: w for w in await c.list_workers()}
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or "," not in self.address:
                        raise  # a coordinator of a cluster may be down: the others answer
        return found

    def pinned_keys(self) -> list[bytes]:
        """The coordinator keys receipts must be countersigned by (one of)."""
        return [self.coordinator_key, *self.cluster_keys]

    def worker_coordinators(self, n: int) -> str:
        """The --coordinator of the n-th worker."""
        return self.address

    def client_coordinators(self) -> list[str]:
        """The coordinators the client's SDK network lists."""
        return self.address.split(",")

    async def start_workers(self) -> None:
        began = time.monotonic()
        for n, w in enumerate(self.workers):
            await self.start_worker(w, n=n)
        seen = await self.wait_listed(self.workers)
        for w in self.workers:
            self.show_listed(w, seen[w.worker_id])
        say(
            f"{INDENT}ListWorkers shows all {len(self.workers)} connected "
            f"({time.monotonic() - began:.1f}s)"
        )
        if self.track.agents:
            await self.show_reputation("before")

    async def start_worker(self, w: WorkerInfo, *extra: str, n: int = 0) -> dict[str, Any]:
        """Starts worker w (the n-th: see worker_coordinators) with extra arguments."""
        info = await self.procs.spawn(
            w.label,
            "worker",
            "--coordinator",
            self.worker_coordinators(n),
            "--kind",
            w.kind,
            "--key-file",
            str(w.key_file),
            "--drain-timeout",
            "5",
            *extra,
        )
        w.worker_id = str(info.get("worker_id", ""))
        if not w.worker_id:
            raise DemoError(f"{w.label} did not report its worker id: {info}")
        if str(info.get("agent_id", "")) != w.agent_id:
            raise DemoError(f"{w.label} connects as agent {info.get('agent_id')!r}")
        return info

    async def wait_listed(self, workers: list[WorkerInfo]) -> dict[str, coordinator_pb2.WorkerInfo]:
        """Polls ListWorkers until every one of workers is there with its verified agent id."""
        began = time.monotonic()
        wanted = {w.worker_id for w in workers}
        while True:
            seen = await self.list_workers()
            if wanted <= seen.keys() and all(
                seen[w.worker_id].agent_id == w.agent_id for w in workers
            ):
                return seen
            if time.monotonic() - began > CONNECT_TIMEOUT:
                missing = ", ".join(w.label for w in workers if w.worker_id not in seen)
                raise DemoError(f"not connected after {CONNECT_TIMEOUT:.0f}s: {missing}")
            await asyncio.sleep(POLL_INTERVAL)

    def show_listed(self, w: WorkerInfo, info: coordinator_pb2.WorkerInfo, note: str = "") -> None:
        kind = _KIND_NAMES.get(info.kind, "?")
        agent = f"agent #{info.agent_id} (verified)" if info.agent_id else "no agent id"
        say(
            f"{INDENT}{w.label:<10} {kind:<8} id {short(w.worker_id)}  {agent}  "
            f"tasks: {', '.join(info.tasks)}{note}"
        )

    async def show_reputation(self, when: str) -> None:
        """Each worker's reputation as ListWorkers shows it (what matching uses)."""
        listed = await self.list_workers()
        scores = "  ".join(
            f"{w.label} {listed[w.worker_id].reputation:.2f}"
            if w.worker_id in listed
            else f"{w.label} -"
            for w in self.workers
        )
        say(f"{INDENT}reputation {when:<6} {scores}  (ListWorkers, source erc8004)")

    async def reputation_after(self) -> None:
        """Waits until the coordinator's feedback for every finished job is on chain, then
        shows it and the workers' reputation again."""
        from dispatchnet.coordinator.jobs import FEEDBACK_TAG1
        from dispatchnet.reputation.score import Evidence, combine

        expected = {w.agent_id: 0 for w in self.workers}
        for o in self.outcomes:
            # (a verified job's runs are rated with spotCheck entries instead: step 10)
            if o.job is not None and o.job.worker_id and o.job.spec.verify <= 1:
                w = next((w for w in self.workers if w.worker_id == o.job.worker_id), None)
                if w is not None:
                    expected[w.agent_id] += 1
        adapter, profile = self.adapter()
        params = profile.reputation.score_params()
        try:  # the reviewer: the coordinator's own account (the deployment's)
            reader = adapter.summary_reader(profile, self.dir / "coordinator", [], FEEDBACK_TAG1)
        except Exception as e:  # web3 raises many types; the chain is the demo's own
            raise DemoError(f"cannot read reputation from the chain: {e}") from e
        began = time.monotonic()
        while True:
            try:
                summaries = {
                    a: await asyncio.to_thread(reader.summary, int(a)) for a in expected if a
                }
            except Exception as e:  # as above
                raise DemoError(f"cannot read getSummary from the chain: {e}") from e
            if all(summaries[a][0] >= n for a, n in expected.items()):
                break
            if time.monotonic() - began > FEEDBACK_TIMEOUT:
                raise DemoError(
                    f"feedback not on chain after {FEEDBACK_TIMEOUT:.0f}s "
                    f"(agents: on chain / jobs {summaries} / {expected})"
                )
            await asyncio.sleep(0.5)
        say(
            f"{INDENT}the coordinator posted one giveFeedback per job "
            f"(successRate 100 = completed); on chain after {time.monotonic() - began:.1f}s:"
        )
        for w in self.workers:
            count, value = summaries[w.agent_id]
            # the erc8004 source's formula (feedback seconds old: no decay to speak of)
            score = combine(Evidence(0, count, count * value / 100), params).score
            say(
                f"{INDENT}  {w.label:<10} agent #{w.agent_id}: getSummary -> {count} "
                f"feedback{'' if count == 1 else 's'}, average {f'{value:g}' if count else '-'}"
                f" -> score {score:.2f}"
            )
        await self.show_reputation("after")

    # --- payments ------------------------------------------------------------------------------

    async def open_wallet(self) -> None:
        """The client's x402 wallet on this chain (the deployment's funded "client" account)
        and its payment asset, the deployment's test USDC; balances before any job."""
        adapter, profile = self.adapter()
        self.wallet = adapter.client_wallet(profile, "")
        if self.wallet is None or not self.wallet.extra_assets:
            raise DemoError("the deployment has no funded client account or test USDC")
        self.asset = self.wallet.extra_assets[0]
        await self.find_payout_addresses()
        self.before = await self.balances()

    @property
    def payee(self) -> str:
        return str(self.chain["accounts"]["coordinator"]["address"])

    async def find_payout_addresses(self) -> None:
        """Where the coordinator's payout loop pays each worker, read on chain the way it
        reads it (the agent's wallet or owner on EVM; the Solana address its registration
        links on Solana); none for a worker without an agent id."""
        if not any(w.agent_id for w in self.workers):
            return
        adapter, profile = self.adapter()
        try:
            lookup = adapter.payout_addresses(profile, self.dir / "coordinator")
            for w in self.workers:
                if w.agent_id:
                    found: str | None = await asyncio.to_thread(lookup, w.agent_id)
                    w.payout_address = found or ""
        except Exception as e:  # the chain libraries raise many types; the chain is our own
            raise DemoError(f"cannot read the workers' payout addresses on chain: {e}") from e

    def holders(self) -> list[tuple[str, str]]:
        """(row label, address) of every account whose test USDC the demo follows."""
        rows = [("payer", self.wallet.address), ("coordinator", self.payee)]
        return rows + [(w.label, w.payout_address) for w in self.workers if w.payout_address]

    async def balances(self) -> dict[str, int]:
        """Test USDC of the paying client, the coordinator (the payee, and the payouts'
        sender) and each worker's payout address, on chain."""
        adapter, profile = self.adapter()
        try:
            return {
                address: await asyncio.to_thread(
                    adapter.token_balance, profile, self.asset.address, address
                )
                for _, address in self.holders()
            }
        except Exception as e:  # the chain libraries raise many types; the chain is our own
            raise DemoError(f"cannot read balances on chain: {e}") from e

    async def earnings(self) -> dict[str, coordinator_pb2.GetEarningsResponse]:
        """Each worker's GetEarnings (signed with its own key), by label."""
        out = {}
        for w in self.workers:
            async with CoordinatorClient(self.address, keys.load(w.key_file)) as c:
                out[w.label] = await c.earnings()
        return out

    async def wait_for_payouts(self) -> dict[str, coordinator_pb2.GetEarningsResponse]:
        """Polls GetEarnings until every worker with a payout address has nothing left to
        be paid and each of its payouts landed (bounded by PAYOUT_TIMEOUT)."""
        began = time.monotonic()
        if not any(w.payout_address for w in self.workers):
            say(f"{INDENT}no worker has a payout address: their shares stay unpaid")
            return await self.earnings()
        while True:
            earnings = await self.earnings()
            waiting = [
                w.label
                for w in self.workers
                if w.payout_address
                and (
                    any(int(b.balance) for b in earnings[w.label].balances)
                    or any(p.state != "landed" for p in earnings[w.label].payouts)
                )
            ]
            if not waiting:
                say(f"{INDENT}payouts landed ({time.monotonic() - began:.1f}s after the jobs)")
                return earnings
            if time.monotonic() - began > PAYOUT_TIMEOUT:
                raise DemoError(
                    f"payouts not landed after {PAYOUT_TIMEOUT:.0f}s: {', '.join(waiting)}"
                )
            await asyncio.sleep(0.5)

    async def show_payments(self) -> None:
        """Waits for the payouts, then shows the balances before and after (read on chain),
        the settlement and payout transactions; a problem if they do not add up: the payer
        paid what the settled jobs cost, and that is what the coordinator kept plus what
        reached the workers' payout addresses plus the shares not paid out yet."""
        earnings = await self.wait_for_payouts()
        before, after = self.before, await self.balances()
        a = self.amount
        say(f"{INDENT}{'':12}{'before':>20}{'after':>20}")
        for label, address in self.holders():
            role = " (coordinator: payee, pays the payouts)" if label == "coordinator" else ""
            say(
                f"{INDENT}{label:12}{a(before[address]):>20}{a(after[address]):>20}"
                f"  {address}{role}"
            )
        for w in self.workers:
            if not w.payout_address:
                say(f"{INDENT}{w.label:12}{'-':>20}{'-':>20}  no payout address (no agent id)")
        paid = 0
        for o in self.outcomes:
            if o.job is not None and o.job.payment.status == "settled":
                p = o.job.payment
                paid += int(p.amount)
                say(f"{INDENT}settled  {o.title:22} {a(int(p.amount))} in {p.transaction}")
        unpaid = 0
        for w in self.workers:
            e = earnings[w.label]
            for payout in e.payouts:
                if payout.state == "landed":
                    say(
                        f"{INDENT}payout   {w.label:22} {a(int(payout.amount))} in "
                        f"{payout.transaction}"
                    )
            owed = sum(int(b.balance) for b in e.balances) + sum(
                int(p.amount) for p in e.payouts if p.state in ("pending", "signed")
            )
            if owed:
                unpaid += owed
                say(
                    f"{INDENT}unpaid   {w.label:22} {a(owed)} accrued, NOT YET PAID "
                    "(GetEarnings; no payout address)"
                )
        payer = before[self.wallet.address] - after[self.wallet.address]
        kept = after[self.payee] - before[self.payee]
        shares = sum(
            after[w.payout_address] - before[w.payout_address]
            for w in self.workers
            if w.payout_address
        )
        fees_kept = kept - unpaid  # what the coordinator still holds for the workers aside
        say(
            f"{INDENT}add up   payer paid {payer} = fees kept {fees_kept} + shares paid {shares}"
            f" + shares not yet paid {unpaid}  (atomic units)"
        )
        say(
            f"{INDENT}         (the coordinator's balance changed by {kept} = fees {fees_kept}"
            f" + the unpaid shares it still holds {unpaid})"
        )
        if payer != paid:
            raise DemoError(f"the payer paid {payer}, the settled payments add up to {paid}")
        if payer != kept + shares:
            raise DemoError(
                f"the payer paid {payer}, the coordinator kept {kept} and the workers got {shares}"
            )
        fee_bps = next(iter(earnings.values())).fee_bps if earnings else 0
        jobs = [int(j.price) for e in earnings.values() for j in e.jobs]
        fees = sum(price * fee_bps // 10_000 for price in jobs)
        if fees_kept != fees:
            raise DemoError(
                f"the coordinator kept {fees_kept} in fees, {fee_bps} bps of the jobs is {fees}"
            )
        say(
            f"{INDENT}they add up: the payer paid exactly the {a(paid)} its settled jobs cost, "
            f"once each; fees kept {a(fees)} ({fee_bps} bps), shares paid {a(shares)}, "
            f"not yet paid {a(unpaid)}"
        )

    async def payment_moves(
        self, c: CoordinatorClient, job: coordinator_pb2.Job, seen: list[str], until: set[str]
    ) -> coordinator_pb2.Job:
        """Polls the job until its payment status is in `until` (noting each status seen)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while job.payment.status not in until and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            job = await c.get(job.job_id)
            _note(seen, job.payment.status)
        return job

    # --- scenarios -----------------------------------------------------------------------------

    async def play_scenarios(self) -> None:
        scenarios: list[tuple[str, str, Callable[[Client, Outcome], Awaitable[None]]]]
        scenarios = [
            (
                "public fast LLM",
                "a summary by the desktop's embedded model, tokens streamed live",
                self.public_llm,
            ),
            (
                "public cheap task",
                "word_count at CHEAP policy (matching favours seekers)",
                self.public_task,
            ),
            (
                "private task",
                "no paired worker yet: the SDK's hosted fallback; then echo that only a "
                "worker paired with the client may run",
                self.private_task,
            ),
        ]
        wallet = self.wallet
        router = self.router()
        async with (
            router,
            CoordinatorClient(self.client_coordinators(), self.client_key, wallet) as coordinator,
        ):
            say(
                f"\nThe client is just an ed25519 key ({short(self.client_key.public_hex)});"
                " the jobs it commits belong to it. It uses the SDK (dispatchnet.sdk."
                "ComputeRouter): quote, commit paying with x402 from the wallet"
                f" {wallet.address} ({self.amount(self.before[wallet.address])}, the"
                f" deployment's test token, at most {usd(wallet.max_per_job_micros)} per job),"
                " watch, and the receipt's signatures checked before the result is returned."
            )
            client = Client(router, coordinator)
            for n, (title, what, play) in enumerate(scenarios, start=1):
                self.step(4 + n, f"Scenario {n}, {title}: {what}")
                outcome = Outcome(self.track.name, title)
                self.outcomes.append(outcome)
                try:
                    await play(client, outcome)
                except STEP_ERRORS as e:
                    self.failed(e, outcome.problems)

    def router(self) -> ComputeRouter:
        """The client's SDK router: this track's coordinator (its key expected on every
        receipt), paying from the wallet, the hosted stand-in as its fallback."""
        network = Network(
            self.track.name.lower(),
            self.client_coordinators(),
            self.wallet,
            coordinator_key=self.coordinator_key,
            coordinator_keys=self.cluster_keys,
        )
        return ComputeRouter(
            [network],
            key=self.client_key,
            hosted=[self.hosted] if self.hosted is not None else [],
            prices={HOSTED_MODEL: HOSTED_PRICE},
        )

    async def run_job(
        self,
        c: Client,
        outcome: Outcome,
        spec: common_pb2.JobSpec,
        stream: bool = False,
    ) -> coordinator_pb2.Job:
        """The job through the SDK (decentralized only: the network must run it), then its
        payment followed to settlement and its receipt checked offline by the CLI."""
        sdk_spec = to_types(spec, sdk_types.JobSpec)
        try:
            if stream:
                tokens = c.router.stream(sdk_spec, decentralized_only=True, timeout=JOB_TIMEOUT)
                started = False
                async for token in tokens:
                    if not started:
                        print(f"{INDENT}tokens   ", end="", flush=True)
                        started = True
                    print(token.replace("\n", " "), end="", flush=True)
                if started:
                    print(flush=True)
                result = tokens.result
            else:
                result = await c.router.run(sdk_spec, decentralized_only=True, timeout=JOB_TIMEOUT)
        except SdkError as e:
            raise DemoError(f"the SDK refused: {e}") from None
        job = to_pb(result.job, coordinator_pb2.Job) if result.job is not None else None
        if job is None:
            raise DemoError(f"the job ran on the {result.route} route, not on the network")
        outcome.job = job
        outcome.worker = self.label(job.worker_id)
        policy = common_pb2.Policy.Name(job.spec.policy).removeprefix("POLICY_")
        p = job.payment
        say(
            f"{INDENT}route    {result.route}: {job.job_id} at {usd(result.price.amount_micros)}"
            f" ({policy} prices), {result.latency_ms:.0f} ms end to end"
        )
        when = (
            "transferred at commit, held while the job ran, refunded on chain had it failed"
            if self.track.settles_at_commit
            else "settled once the job completed"
        )
        say(
            f"{INDENT}paid     x402: {self.amount(int(p.amount or 0))} signed by "
            f"{p.payer[:6]}…{p.payer[-4:]} on {p.network} ({when})"
        )
        tries = "attempt" if job.attempts == 1 else "attempts"
        say(f"{INDENT}result   {state_name(job.state)} after {job.attempts} {tries}")
        say(f"{INDENT}worker   {outcome.worker}")
        say(f"{INDENT}output   {output_text(job)}")
        seen = [p.status]
        job = await self.payment_moves(c.coordinator, job, seen, {"settled", "failed", "refunded"})
        outcome.job = job
        if job.payment.status != "settled":
            raise DemoError(f"payment still {job.payment.status} after {SETTLE_TIMEOUT:.0f}s")
        say(
            f"{INDENT}settled  {self.amount(int(job.payment.amount))} in "
            f"{job.payment.transaction}  ({' -> '.join(seen)})"
        )
        say(f"{INDENT}receipt  both signatures checked by the SDK before it returned the result")
        await self.check_receipt(job, outcome)
        return job

    async def check_receipt(self, job: coordinator_pb2.Job, outcome: Outcome) -> None:
        problems: list[str] = []
        if not job.HasField("receipt"):
            problems.append("the job has no receipt")
        else:
            v = verify_receipt_message(job.receipt, self.pinned_keys())
            problems += v.problems
            if v.body is not None:
                if v.body.job_id != job.job_id:
                    problems.append("the receipt is for another job")
                if v.body.worker_public_key.hex() != job.worker_id:
                    problems.append("the receipt was signed by another worker")
        in_process = "valid" if not problems else "INVALID"

        path = self.dir / f"{job.job_id}.json"
        path.write_text(json.dumps(job_json(job), indent=2) + "\n")
        code, out, err = await self.procs.run(
            "receipt",
            "verify",
            str(path),
            "--coordinator-key",
            ",".join(k.hex() for k in self.pinned_keys()),
        )
        offline = "exit 0" if code == 0 else f"exit {code}"
        if code != 0:
            detail = err.strip() or out.strip()
            problems.append(f"`dispatch receipt verify` exited {code}: {detail[-300:]}")
        say(f"{INDENT}receipt  {in_process}: worker and coordinator signatures checked in-process")
        say(f"{INDENT}         offline: `dispatch receipt verify {path.name}` -> {offline}")
        outcome.receipt_valid = not problems
        outcome.problems += problems

    async def public_task(self, c: Client, outcome: Outcome) -> None:
        text = "Dispatch sends small jobs to phones and desktops, and signs a receipt for each"
        await self.run_job(
            c, outcome, task_spec("word_count", json.dumps(text).encode(), common_pb2.POLICY_CHEAP)
        )

    async def public_llm(self, c: Client, outcome: Outcome) -> None:
        prompt = (
            "Summarize in one sentence: Dispatch is a compute network where idle phones and "
            "laptops earn money by running small jobs such as language-model inference. "
            "Clients pay per job, and every result comes with a receipt signed by the worker "
            "and the coordinator."
        )
        spec = llm_spec(prompt, max_tokens=48, temperature=0.0, policy=common_pb2.POLICY_FAST)
        job = await self.run_job(c, outcome, spec, stream=True)
        usage = job.result.usage
        say(
            f"{INDENT}usage    {usage.prompt_tokens} prompt + {usage.completion_tokens} "
            "completion tokens, generated by SmolLM2-135M on the desktop (no cloud)"
        )

    async def hosted_fallback(self, c: Client, outcome: Outcome) -> None:
        """A PRIVATE summarize before any worker is paired with the client: the network
        cannot run it, so the SDK's hosted fallback does (nothing is committed or paid)."""
        title = f"{outcome.title}: hosted fallback"
        fallback = Outcome(self.track.name, title)
        self.outcomes.insert(self.outcomes.index(outcome), fallback)
        article = (
            "Volunteers filled sandbags all night as the river rose. By morning the water "
            "had started to fall and the town centre was dry."
        )
        try:
            result = await c.router.run_task("summarize", {"text": article}, privacy="private")
        except SdkError as e:
            raise DemoError(f"the SDK's fallback failed: {e}") from None
        why = ", ".join(f"{s.network}: {s.reason}" for s in result.skipped) or "-"
        say(f"{INDENT}private  summarize, no worker paired with the client yet ({why})")
        say(
            f"{INDENT}route    {result.route}: a local llama.cpp server with the shipped model "
            f"stands in for the hosted provider here ({result.model}, "
            f"~{usd(result.price.amount_micros)} estimated, billed to the provider key)"
        )
        say(f"{INDENT}output   {result.output[:70]}")
        fallback.worker = f"hosted ({result.route}, local stand-in)"
        fallback.hosted = result.output
        if result.route == "dispatch" or not result.output:
            fallback.problems.append(f"expected the hosted route, got {result.route!r}")

    async def private_task(self, c: Client, outcome: Outcome) -> None:
        await self.hosted_fallback(c, outcome)
        owner = self.workers[0]
        code = await c.coordinator.create_pairing_code()
        say(f"{INDENT}pairing  client created code {code.code}")
        rc, out, err = await self.procs.run(
            "pair",
            "claim",
            code.code,
            "--coordinator",
            self.address,
            "--key-file",
            str(owner.key_file),
        )
        if rc != 0:
            raise DemoError(f"`dispatch pair claim` exited {rc}: {(err or out).strip()[-300:]}")
        pairing = json.loads(out)
        if pairing.get("worker_id") != owner.worker_id:
            raise DemoError(f"the pairing names worker {pairing.get('worker_id')!r}")
        say(
            f"{INDENT}         {owner.label}'s owner claims it: "
            f"`dispatch pair claim {code.code} --key-file {owner.key_file.name}`"
        )
        say(
            f"{INDENT}         -> {pairing.get('pairing_id')}: client "
            f"{short(self.client_key.public_hex)} <-> {owner.label} ({short(owner.worker_id)})"
        )
        data = json.dumps({"note": "for my own devices only"}).encode()
        job = await self.run_job(
            c, outcome, task_spec("echo", data, common_pb2.POLICY_AUTO, private=True)
        )
        if job.spec.HasField("sealed"):
            say(
                f"{INDENT}sealed   input and output encrypted end to end (the coordinator "
                f"stored {len(job.result.output)} bytes of ciphertext)"
            )
        else:
            outcome.problems.append("the private job was not encrypted end to end")
        if job.worker_id == owner.worker_id:
            say(f"{INDENT}check    ran on the paired worker {owner.label}: ok")
        else:
            outcome.problems.append(
                f"the private job ran on {self.label(job.worker_id)}, not on {owner.label}"
            )
            say(f"{INDENT}check    ran on {self.label(job.worker_id)}, NOT the paired worker")

    # --- a lying worker (agents) ---------------------------------------------------------------

    async def catch_a_liar(self, liar: WorkerInfo) -> None:
        """Starts the liar (`dispatch worker --lie-rate 1`), runs a verify=3 word_count through
        the SDK until the liar is among the three workers picked, and shows the vote, the
        client's right answer, the receipt's verification record, who was paid, the
        spotCheck feedback on chain and the liar's score before and after."""
        await self.start_worker(liar, "--lie-rate", "1")
        listed = await self.wait_listed([liar])
        self.show_listed(liar, listed[liar.worker_id], "  (--lie-rate 1)")
        say(
            f"{INDENT}(`dispatch worker --kind seeker --lie-rate 1 --key-file {liar.key_file.name}`"
            ": every answer it returns is wrong, and properly signed; demos and tests only)"
        )
        reader = self.spot_check_reader()
        before = await self.chain_score(reader, liar)
        prior = before["params"]["prior"]
        say(
            f"{INDENT}liar     agent #{liar.agent_id} before: score {before['score']:.2f} on chain "
            f"(no feedback yet: a new agent's {prior:g}), ListWorkers "
            f"{listed[liar.worker_id].reputation:.2f}"
        )
        text = "Three workers run the same job, and the coordinator keeps the answer they agree on"
        data = json.dumps(text).encode()
        right = (await run_task("word_count", data)).output
        caught: list[str] = []  # the workers of the job that caught the liar
        async with (
            self.router() as router,
            CoordinatorClient(self.address, self.client_key, self.wallet) as coordinator,
        ):
            for attempt in range(1, LIAR_TRIES + 1):
                title = "verified task" + (f", try {attempt}" if attempt > 1 else "")
                outcome = Outcome(self.track.name, title)
                self.outcomes.append(outcome)
                agreeing, dissenting = await self.verified_job(
                    router, coordinator, data, right, outcome
                )
                if liar.worker_id in dissenting:
                    caught = agreeing + dissenting
                    break
                say(
                    f"{INDENT}         the liar was not among the 3 workers matching picked "
                    "(a weighted random choice): the job again"
                )
        if not caught:
            raise DemoError(f"the liar was not picked in {LIAR_TRIES} verify=3 jobs")
        await self.show_spot_checks(reader, caught, liar, before)

    async def verified_job(
        self,
        router: ComputeRouter,
        coordinator: CoordinatorClient,
        data: bytes,
        right: bytes,
        outcome: Outcome,
    ) -> tuple[list[str], list[str]]:
        """One verify=3 word_count through the SDK, paid and settled, its receipt's
        verification record checked and each run's credit shown; the ids of the agreeing
        and the dissenting workers."""
        try:
            result = await router.run_task(
                "word_count", data, policy="cheap", verify=3, decentralized_only=True,
                timeout=JOB_TIMEOUT,
            )  # fmt: skip
        except SdkError as e:
            raise DemoError(f"the SDK refused: {e}") from None
        if result.job is None or result.receipt_body is None:
            raise DemoError(f"the job ran on the {result.route} route, not on the network")
        job = to_pb(result.job, coordinator_pb2.Job)
        outcome.job = job
        outcome.worker = self.label(job.worker_id)
        record = result.receipt_body.verification
        agreeing = [bytes(k).hex() for k in record.agreeing_worker_keys]
        dissenting = [bytes(k).hex() for k in record.dissenting_worker_keys]
        say(
            f"{INDENT}route    {result.route}: {job.job_id} word_count with verify=3 at "
            f"{usd(result.price.amount_micros)} (3 runs), {result.latency_ms:.0f} ms end to end"
        )
        names = ", ".join(self.label(w) for w in agreeing)
        if dissenting:
            say(f"{INDENT}runs     {names} agree")
            say(
                f"{INDENT}         {', '.join(self.label(w) for w in dissenting)} dissented: "
                f"outvoted {len(agreeing)} to {len(dissenting)}"
            )
        else:
            say(f"{INDENT}runs     all {len(agreeing)} agree: {names}")
        same = result.output_bytes == right
        say(
            f"{INDENT}output   {result.output}  ("
            + ("the right answer: word_count run here gives the same)" if same else "WRONG)")
        )
        if not same:
            outcome.problems.append(f"the client got {result.output!r}, not {right.decode()!r}")
        self.check_record(job, agreeing, dissenting, outcome)
        seen = [job.payment.status]
        job = await self.payment_moves(coordinator, job, seen, {"settled", "failed", "refunded"})
        outcome.job = job
        if job.payment.status != "settled":
            raise DemoError(f"payment still {job.payment.status} after {SETTLE_TIMEOUT:.0f}s")
        say(
            f"{INDENT}settled  {self.amount(int(job.payment.amount))} in "
            f"{job.payment.transaction}  ({' -> '.join(seen)})"
        )
        credits = []
        for worker_id in agreeing + dissenting:
            w = next((w for w in self.all_workers if w.worker_id == worker_id), None)
            if w is None:
                continue
            async with CoordinatorClient(self.address, keys.load(w.key_file)) as c:
                earned = await c.earnings()
            share = sum(int(j.share) for j in earned.jobs if j.job_id == job.job_id)
            credits.append(f"{w.label} {self.amount(share) if share else 'nothing'}")
        say(f"{INDENT}credited {', '.join(credits)}  (GetEarnings: the agreeing split the share)")
        return agreeing, dissenting

    def check_record(
        self, job: coordinator_pb2.Job, agreeing: list[str], dissenting: list[str], o: Outcome
    ) -> None:
        """The receipt's signatures and its verification record, checked in-process."""
        v = verify_receipt_message(job.receipt, self.pinned_keys())
        problems = list(v.problems)
        if v.body is not None:
            r = v.body.verification
            if r.mode != receipt_pb2.VERIFICATION_MODE_REDUNDANT or r.runs != 3:
                problems.append("the receipt does not record 3 redundant runs")
            if r.output_sha256 != hashlib.sha256(job.result.output).digest():
                problems.append("the record's output hash is not the result's")
            if agreeing[:1] != [job.worker_id] or v.body.worker_public_key.hex() != job.worker_id:
                problems.append("the record does not start with the receipt's worker")
        say(
            f"{INDENT}receipt  {'valid' if not problems else 'INVALID'}: both signatures, and the "
            f"coordinator's record: REDUNDANT, 3 runs, {len(agreeing)} agreeing on the output's "
            f"hash (the receipt's worker first), {len(dissenting)} dissenting"
        )
        o.receipt_valid = not problems
        o.problems += problems

    def spot_check_reader(self) -> Any:
        """The chain's spotCheck feedback from the coordinator's account (the reviewer)."""
        from dispatchnet.coordinator.verification import SPOT_CHECK_TAG

        adapter, profile = self.adapter()
        try:
            return adapter.summary_reader(profile, self.dir / "coordinator", [], SPOT_CHECK_TAG)
        except Exception as e:  # web3 raises many types; the chain is the demo's own
            raise DemoError(f"cannot read reputation from the chain: {e}") from e

    async def chain_score(self, reader: Any, w: WorkerInfo) -> dict[str, Any]:
        """The agent's score as the erc8004 source computes it from the chain (what
        `dispatch chain reputation` shows)."""
        from dispatchnet.reputation.erc8004 import explain

        _, profile = self.adapter()
        try:
            page = await asyncio.to_thread(
                reader.feedback, int(w.agent_id), profile.reputation.from_block
            )
        except Exception as e:  # as above
            raise DemoError(f"cannot read feedback from the chain: {e}") from e
        return explain(page, profile.reputation.score_params())

    async def show_spot_checks(
        self, reader: Any, ran: list[str], liar: WorkerInfo, before: dict[str, Any]
    ) -> None:
        """Waits until the spotCheck feedback of the workers that ran the job (ran: their
        ids) is on chain, reads it back, and shows the liar's score before and after."""
        rated = [w for w in self.all_workers if w.worker_id in ran and w.agent_id]
        began = time.monotonic()
        while True:
            try:
                summaries = {
                    w.label: await asyncio.to_thread(reader.summary, int(w.agent_id)) for w in rated
                }
            except Exception as e:  # web3 raises many types; the chain is the demo's own
                raise DemoError(f"cannot read getSummary from the chain: {e}") from e
            if all(count >= 1 for count, _ in summaries.values()):
                break
            if time.monotonic() - began > FEEDBACK_TIMEOUT:
                raise DemoError(f"spotCheck feedback not on chain after {FEEDBACK_TIMEOUT:.0f}s")
            await asyncio.sleep(0.5)
        after = await self.chain_score(reader, liar)
        entries = [f for f in after["feedback"] if f["tag1"] == "spotCheck"]
        say(
            f"{INDENT}feedback one giveFeedback per run (tag1 spotCheck), on chain after "
            f"{time.monotonic() - began:.1f}s; read back:"
        )
        for f in entries:
            say(
                f"{INDENT}  {liar.label:<10} agent #{liar.agent_id}: entry #{f['index']} by "
                f"{f['client'][:6]}…{f['client'][-4:]} in block {f['block']}: spotCheck "
                f"{f['value']:g} ({f['tag2']})"
            )
        for w in rated:
            count, value = summaries[w.label]
            say(
                f"{INDENT}  {w.label:<10} agent #{w.agent_id}: getSummary(spotCheck) -> "
                f"{count} entr{'y' if count == 1 else 'ies'}, average {value:g}"
            )
        listed = await self.list_workers()
        prior = before["params"]["prior"]
        spot = after["spot_checks"]
        say(
            f"{INDENT}liar     agent #{liar.agent_id}: score {before['score']:.2f} -> "
            f"{after['score']:.2f} on chain (success {after['success']['rate']:.2f} x agreement "
            f"{spot['agreement']:.3f}: {spot['decayed_disagreed']:g} lost spot check counts "
            f"{after['params']['spot_check_penalty']}-fold); ListWorkers "
            f"{listed[liar.worker_id].reputation:.2f}, below a new agent's {prior:g}"
        )
        if not entries or any(f["value"] != 0 for f in entries):
            raise DemoError(f"the liar's spotCheck feedback on chain is {entries}")
        # (in a cluster the liar's own coordinator may not be the one that compared the
        # runs: its cached score follows at its next refresh from the chain)
        cached_ok = listed[liar.worker_id].reputation < prior or "," in self.address
        if not after["score"] < prior or not cached_ok:
            raise DemoError("the liar's score did not drop below a new agent's")

    # --- the anchor ----------------------------------------------------------------------------

    async def verify_onchain(self, job: coordinator_pb2.Job) -> None:
        """`dispatch receipt proof` (retried until the batch is anchored), then
        `dispatch receipt verify --proof --onchain`."""
        profile_name = self.track.profile
        job_file = self.dir / f"{job.job_id}.json"
        proof_file = self.dir / "proof.json"
        began = time.monotonic()
        proof: dict[str, Any] = {}
        while True:
            code, out, err = await self.procs.run(
                "receipt",
                "proof",
                job.job_id,
                "--coordinator",
                self.address,
                "--key-file",
                str(self.client_key_file),
            )
            if code == 0:
                proof = json.loads(out)
                if proof.get("anchor_transaction"):
                    break
            elif "not batched yet" not in err:
                raise DemoError(f"`dispatch receipt proof` exited {code}: {err.strip()[-300:]}")
            if time.monotonic() - began > PROOF_TIMEOUT:
                raise DemoError(f"receipt not anchored after {PROOF_TIMEOUT:.0f}s")
            await asyncio.sleep(0.5)
        proof_file.write_text(out)
        say(
            f"{INDENT}`dispatch receipt proof {job.job_id} > proof.json` "
            f"({time.monotonic() - began:.1f}s)"
        )
        say(
            f"{INDENT}  batch {proof.get('batch_id')}: leaf {proof.get('leaf_index', 0)} "
            f"of {proof.get('leaf_count')}"
        )
        code, out, err = await self.procs.run(
            "receipt",
            "verify",
            job_file.name,
            "--proof",
            proof_file.name,
            "--onchain",
            "--profile",
            profile_name,
            "--coordinator-key",
            ",".join(k.hex() for k in self.pinned_keys()),
        )
        say(
            f"{INDENT}`dispatch receipt verify {job_file.name} --proof proof.json --onchain "
            f"--profile {profile_name}` -> exit {code}"
        )
        try:
            result = json.loads(out)
        except ValueError:
            result = {}
        p = result.get("proof", {})
        onchain = p.get("onchain", {})
        say(f"{INDENT}  root        0x{p.get('merkle_root', '?')}")
        say(
            f"{INDENT}  anchor tx   {p.get('anchor_transaction', '?')} on {p.get('anchor_network')}"
        )
        # what the chain's check read back (an anchor contract and block, or a memo and slot)
        where = [
            f"{label} {onchain[key]}"
            for key, label in (
                ("receipt_anchor", "ReceiptAnchor"),
                ("anchored_in_block", "block"),
                ("slot", "slot"),
                ("memo", "memo"),
            )
            if onchain.get(key)
        ]
        say(f"{INDENT}  on chain    {', '.join(where)}, anchored by {onchain.get('anchorer', '?')}")
        if code != 0:
            problems = result.get("problems") or [(err or out).strip()[-300:]]
            raise DemoError(f"on-chain verify failed: {'; '.join(map(str, problems))}")


def _note(seen: list[str], status: str) -> None:
    if status and seen[-1:] != [status]:
        seen.append(status)


def summary(runs: list[TrackRun]) -> None:
    rows = [
        ("Chain", "Scenario", "Job id", "State", "Worker", "Price", "Payment", "Tries", "Receipt")
    ]
    outcomes = [o for r in runs for o in r.outcomes]
    for o in outcomes:
        j = o.job
        if o.hosted:
            rows.append((o.chain, o.title, "-", "-", o.worker, "-", "(hosted)", "-", "-"))
            continue
        rows.append(
            (
                o.chain,
                o.title,
                j.job_id if j else "-",
                state_name(j.state) if j else "-",
                o.worker,
                usd(j.price.amount_micros) if j else "-",
                j.payment.status if j else "-",
                str(j.attempts) if j else "-",
                "valid" if o.receipt_valid else "NO",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        say("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            say("  " + "  ".join("-" * w for w in widths))
    for o in outcomes:
        if o.problems or not o.ok:
            for p in o.problems or ["did not complete"]:
                say(f"  ! {o.chain} {o.title}: {p}")
    for r in runs:
        for p in r.problems:
            say(f"  ! {r.track.name} chain: {p}")


@contextlib.contextmanager
def quiet_chain_clients() -> Iterator[None]:
    """The demo's own chain reads (balances, the Solana wallet's blockhash) would log each
    RPC request at INFO and warn that solana-py's sync Client is deprecated, in the middle
    of the output the user watches."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Client is deprecated")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


async def run_demo(keep_open: bool = False) -> int:
    """Runs the demo; 0 when, on every track, every scenario completed on the right worker,
    paid and settled on chain with a valid receipt, the balances read on chain added
    up (payer paid = fees + shares paid + shares not yet paid), a receipt checked out on
    chain and (agents) the feedback reached the chain. keep_open: each track's dashboard
    stays up at its end until Enter (else LINGER_SECONDS)."""
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-demo-"))
    env = {**os.environ, "DISPATCH_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("DISPATCH_COORDINATOR", None)
    client_key = keys.load_or_create(tmp / "client.key")
    runs = [TrackRun(t, tmp, env, client_key) for t in TRACKS]
    for run in runs:
        run.keep_open = keep_open
    say(
        f"Dispatch demo: the same network on {len(TRACKS)} local chains ("
        + ", ".join(f"{t.name} on {t.profile}" for t in TRACKS)
        + "), one coordinator per chain, each with two seekers, a desktop and a client,"
        " all on this machine"
    )
    say(f"(scratch space: {tmp}, removed at the end; DISPATCH_HOME={tmp / 'home'})")
    stand_in = HostedStandIn(tmp, env)
    try:
        say(
            "The SDK's hosted fallback (OpenAI) is played by llama.cpp's OpenAI-compatible "
            f"server with the shipped model, at {stand_in.url}"
        )
        hosted = await stand_in.ready()
        for run in runs:
            run.hosted = hosted
        with quiet_chain_clients():
            for run in runs:
                await run.play()
        say("\nSummary")
        summary(runs)
        ok = all(r.ok for r in runs)
        say(
            "\nAll scenarios completed on every chain and were paid for on chain, with valid"
            " receipts and an anchored receipt verified on each chain (feedback on chain: "
            f"{', '.join(t.name for t in TRACKS if t.agents)})."
            if ok
            else "\nThe demo FAILED (see above)."
        )
        return 0 if ok else 1
    finally:
        for run in runs:
            await run.stop()
        stand_in.stop()
        shutil.rmtree(tmp, ignore_errors=True)
