"""`dispatch demo`: the whole network on this machine, end to end, on a local EVM chain.

Starts a local chain (`dispatch chain up --profile local-monad`, anvil with Dispatch's
contracts), registers three workers (two seekers, one desktop) as ERC-8004 agents with
`dispatch worker register`, then starts a coordinator on the local-monad profile (receipt
batches close after 2 s and are anchored on the chain; reputation read from the chain) and
the workers as subprocesses. A client then plays the seed's three scenarios: a public FAST
LLM job run by the desktop's embedded model (tokens streamed live), a public CHEAP task and a
PRIVATE task that only the worker the client paired with may run. Every job's receipt is
checked in-process and with `dispatch receipt verify`, exactly as a user would offline. The
workers' reputations are shown before and after the coordinator's on-chain feedback, and one
receipt is checked on chain (`dispatch receipt proof` + `receipt verify --onchain`). Every
job is paid for with x402: the client's wallet (the deployment's funded "client" account)
signs an EIP-3009 authorization for the quoted price in test USDC, the coordinator verifies
it at CommitJob and settles it on chain once the job completes; the payer's and the payee's
balances are shown before and after, with the settlement transactions.
Everything, the chain included, lives in a temporary directory ($DISPATCH_HOME for the
children) that is removed at the end; `dispatch chain down` stops anvil.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet import keys
from dispatchnet.cli import job_json
from dispatchnet.client import CoordinatorClient, llm_spec, task_spec
from dispatchnet.profiles import resolve_path
from dispatchnet.receipts.core import verify_receipt_message

START_TIMEOUT = 20.0
CONNECT_TIMEOUT = 20.0
JOB_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
CHAIN_PROFILE = "local-monad"
# The demo's coordinator runs local-monad with receipt batches closing after this many
# seconds (instead of 10), so the receipts are anchored quickly.
BATCH_MAX_AGE = 2
FEEDBACK_TIMEOUT = 30.0
PROOF_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
WALLET_LIMIT = 100_000  # micro-USD the demo's wallet pays for one job at most
INDENT = "      "

_KIND_NAMES = {common_pb2.WORKER_KIND_SEEKER: "seeker", common_pb2.WORKER_KIND_DESKTOP: "desktop"}


class DemoError(Exception):
    """A step of the demo could not go on."""


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


@dataclass
class Outcome:
    """What one scenario produced and whether it checked out."""

    title: str
    job: coordinator_pb2.Job | None = None
    receipt_valid: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
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


def usdc(atomic: int) -> str:
    """Test USDC atomic units (6 decimals) as an amount."""
    return f"{atomic / 1_000_000:,.6f} USDC"


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


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "DISPATCH_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
        self.env.pop("DISPATCH_COORDINATOR", None)
        self.children: list[Child] = []
        self.address = ""
        self.chain: dict[str, Any] = {}  # the deployment file `dispatch chain up` printed
        self.coordinator_profile = tmp / f"{CHAIN_PROFILE}-demo.toml"
        self.coordinator_key = b""
        self.workers = [
            WorkerInfo("seeker-1", "seeker", tmp / "seeker-1.key"),
            WorkerInfo("seeker-2", "seeker", tmp / "seeker-2.key"),
            WorkerInfo("desktop-1", "desktop", tmp / "desktop-1.key"),
        ]
        self.client_key = keys.load_or_create(tmp / "client.key")
        self.payer_address = ""

    # --- processes ---------------------------------------------------------------------------

    def cli_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dispatchnet.cli", *args]

    async def spawn(self, name: str, *args: str) -> tuple[Child, dict[str, Any]]:
        """Starts a long-running `dispatch` command and reads the JSON line it prints first."""
        log_path = self.tmp / f"{name}.log"
        log_file = _open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cli_args(*args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=self.env,
                cwd=self.tmp,
            )
        except BaseException:
            log_file.close()
            raise
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
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
        return child, info

    async def run_cli(self, *args: str) -> tuple[int, str, str]:
        """Runs a short `dispatch` command to completion: (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.cli_args(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=self.tmp,
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
        """SIGTERM to everything still running (workers first), then kill what lingers."""
        workers = [c for c in self.children if c.name != "coordinator"]
        coordinator = [c for c in self.children if c.name == "coordinator"]
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

    def print_logs(self) -> None:
        for c in self.children:
            lines = _tail(c.log_path)
            if lines:
                print(f"--- last lines of {c.name}'s log ---", file=sys.stderr)
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()

    def label(self, worker_id: str) -> str:
        for w in self.workers:
            if w.worker_id == worker_id:
                return f"{w.label} ({short(worker_id)})"
        return short(worker_id) if worker_id else "-"

    # --- steps -------------------------------------------------------------------------------

    async def start_coordinator(self) -> None:
        _, info = await self.spawn(
            "coordinator",
            "coordinator",
            "--profile",
            str(self.coordinator_profile),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.tmp / "coordinator"),
        )
        try:
            self.address = str(info["listening"])
            self.coordinator_key = bytes.fromhex(str(info["coordinator_public_key"]))
        except (KeyError, ValueError) as e:
            raise DemoError(f"the coordinator's status line lacks {e}: {info}") from None
        say(f"{INDENT}listening on {self.address} (profile {info.get('profile', '?')})")
        say(f"{INDENT}coordinator key {self.coordinator_key.hex()[:16]}...  (signs every receipt)")
        say(f"{INDENT}anchoring {info.get('anchoring', '?')}")
        say(
            f"{INDENT}receipt batches close after {BATCH_MAX_AGE}s; "
            "reputation source: erc8004 (read from the chain)"
        )

    async def start_workers(self) -> None:
        for w in self.workers:
            _, info = await self.spawn(
                w.label,
                "worker",
                "--coordinator",
                self.address,
                "--kind",
                w.kind,
                "--key-file",
                str(w.key_file),
                "--drain-timeout",
                "5",
            )
            w.worker_id = str(info.get("worker_id", ""))
            if not w.worker_id:
                raise DemoError(f"{w.label} did not report its worker id: {info}")
            if str(info.get("agent_id", "")) != w.agent_id:
                raise DemoError(f"{w.label} connects as agent {info.get('agent_id')!r}")
        began = time.monotonic()
        wanted = {w.worker_id for w in self.workers}
        seen: dict[str, coordinator_pb2.WorkerInfo] = {}
        async with CoordinatorClient(self.address, keys.KeyPair.generate()) as c:
            while True:
                seen = {w.worker_id: w for w in await c.list_workers()}
                if wanted <= seen.keys() and all(
                    seen[w.worker_id].agent_id == w.agent_id for w in self.workers
                ):
                    break
                if time.monotonic() - began > CONNECT_TIMEOUT:
                    missing = ", ".join(w.label for w in self.workers if w.worker_id not in seen)
                    raise DemoError(f"not connected after {CONNECT_TIMEOUT:.0f}s: {missing}")
                await asyncio.sleep(POLL_INTERVAL)
        for w in self.workers:
            info_w = seen[w.worker_id]
            kind = _KIND_NAMES.get(info_w.kind, "?")
            say(
                f"{INDENT}{w.label:<10} {kind:<8} id {short(w.worker_id)}  "
                f"agent #{info_w.agent_id or '-'} (verified)  tasks: {', '.join(info_w.tasks)}"
            )
        say(
            f"{INDENT}ListWorkers shows all {len(self.workers)} connected "
            f"({time.monotonic() - began:.1f}s)"
        )
        await self.show_reputation("before")

    async def show_reputation(self, when: str) -> None:
        """Each worker's reputation as ListWorkers shows it (what matching uses)."""
        async with CoordinatorClient(self.address, keys.KeyPair.generate()) as c:
            listed = {w.worker_id: w for w in await c.list_workers()}
        scores = "  ".join(
            f"{w.label} {listed[w.worker_id].reputation:.2f}"
            if w.worker_id in listed
            else f"{w.label} -"
            for w in self.workers
        )
        say(f"{INDENT}reputation {when:<6} {scores}  (ListWorkers, source erc8004)")

    # --- the chain -----------------------------------------------------------------------------

    def write_coordinator_profile(self) -> None:
        """local-monad, with short receipt batches and reputation read from the chain."""
        text = resolve_path(CHAIN_PROFILE).read_text()
        for old, new in (
            ("batch_max_age_seconds = 10", f"batch_max_age_seconds = {BATCH_MAX_AGE}"),
            ('[reputation]\nsource = "local"', '[reputation]\nsource = "erc8004"'),
        ):
            if old not in text:
                raise DemoError(f"profile {CHAIN_PROFILE} has no `{old}` to adjust")
            text = text.replace(old, new)
        self.coordinator_profile.write_text(text)

    async def chain_up(self) -> None:
        code, out, err = await self.run_cli(
            "chain", "up", "--profile", CHAIN_PROFILE, "--port", "0"
        )
        if code != 0:
            raise DemoError(f"`dispatch chain up` exited {code}: {(err or out).strip()[-300:]}")
        self.chain = json.loads(out)
        contracts = self.chain.get("contracts", {})
        say(
            f"{INDENT}`dispatch chain up --profile {CHAIN_PROFILE} --port 0`: anvil at "
            f"{self.chain.get('rpc_url')} ({self.chain.get('network')}, pid "
            f"{self.chain.get('anvil_pid')})"
        )
        say(f"{INDENT}contracts deployed: IdentityRegistry {contracts.get('identity_registry')}")
        say(f"{INDENT}{'':20}ReputationRegistry {contracts.get('reputation_registry')}")
        say(f"{INDENT}{'':20}ReceiptAnchor {contracts.get('receipt_anchor')}")
        self.write_coordinator_profile()

    async def chain_down(self) -> None:
        """`dispatch chain down`; kills the recorded anvil itself if that command fails."""
        if not self.chain:
            return
        try:
            code, out, err = await self.run_cli("chain", "down", "--profile", CHAIN_PROFILE)
        except DemoError as e:
            code, out, err = 1, "", str(e)
        if code == 0:
            say(f"`dispatch chain down`: anvil (pid {self.chain.get('anvil_pid')}) stopped")
            return
        from dispatchnet.devchain.local_chain import stop_pid

        await asyncio.to_thread(stop_pid, int(self.chain.get("anvil_pid") or 0))
        say(f"`dispatch chain down` exited {code} ({(err or out).strip()[-200:]}); anvil killed")

    async def register_workers(self) -> None:
        for w in self.workers:
            code, out, err = await self.run_cli(
                "worker",
                "register",
                "--profile",
                CHAIN_PROFILE,
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
            result = json.loads(out)
            w.agent_id = str(result.get("agent_id", ""))
            if not w.agent_id:
                raise DemoError(f"`dispatch worker register` printed no agent id: {result}")
            say(
                f"{INDENT}{w.label:<10} agent #{w.agent_id}  owner {result.get('chain_address')}"
                f"  tx {str(result.get('tx', ''))[:18]}..."
            )
        say(
            f"{INDENT}(`dispatch worker register --profile {CHAIN_PROFILE} --key-file "
            "<worker key>`; each worker proves its agent on Connect)"
        )

    def _summary_reader(self) -> Callable[[int], tuple[int, int]]:
        """getSummary(agent, [coordinator account], "successRate", "") on the demo chain."""
        import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
        from dispatchnet.chains.evm.node import web3_for
        from dispatchnet.chains.evm.reputation import reputation_contract
        from dispatchnet.coordinator.jobs import FEEDBACK_TAG1

        contract = reputation_contract(
            web3_for(str(self.chain["rpc_url"]), 5.0),
            str(self.chain["contracts"]["reputation_registry"]),
        )
        reviewer = str(self.chain["accounts"]["coordinator"]["address"])

        def read(agent_id: int) -> tuple[int, int]:
            count, value, decimals = contract.functions.getSummary(
                agent_id, [reviewer], FEEDBACK_TAG1, ""
            ).call()
            return int(count), int(value) // 10 ** int(decimals)

        return read

    async def reputation_after(self, outcomes: list[Outcome]) -> None:
        """Waits until the coordinator's feedback for every finished job is on chain, then
        shows it and the workers' reputation again."""
        expected = {w.agent_id: 0 for w in self.workers}
        for o in outcomes:
            if o.job is not None and o.job.worker_id:
                w = next((w for w in self.workers if w.worker_id == o.job.worker_id), None)
                if w is not None:
                    expected[w.agent_id] += 1
        read = self._summary_reader()
        began = time.monotonic()
        while True:
            try:
                summaries = {a: await asyncio.to_thread(read, int(a)) for a in expected if a}
            except Exception as e:  # web3 raises many types; the chain is the demo's own
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
            # the erc8004 source's score with the default prior 0.5 weighted like 2 entries
            score = (count * value / 100 + 2 * 0.5) / (count + 2)
            say(
                f"{INDENT}  {w.label:<10} agent #{w.agent_id}: getSummary -> {count} "
                f"feedback{'' if count == 1 else 's'}, average {value if count else '-'}"
                f" -> score {score:.2f}"
            )
        await self.show_reputation("after")

    async def verify_onchain(self, job: coordinator_pb2.Job) -> bool:
        """`dispatch receipt proof` (retried until the batch is anchored), then
        `dispatch receipt verify --proof --onchain`."""
        job_file = self.tmp / f"{job.job_id}.json"
        proof_file = self.tmp / "proof.json"
        began = time.monotonic()
        proof: dict[str, Any] = {}
        while True:
            code, out, err = await self.run_cli(
                "receipt",
                "proof",
                job.job_id,
                "--coordinator",
                self.address,
                "--key-file",
                str(self.tmp / "client.key"),
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
        code, out, err = await self.run_cli(
            "receipt",
            "verify",
            job_file.name,
            "--proof",
            proof_file.name,
            "--onchain",
            "--profile",
            CHAIN_PROFILE,
            "--coordinator-key",
            self.coordinator_key.hex(),
        )
        say(
            f"{INDENT}`dispatch receipt verify {job_file.name} --proof proof.json --onchain "
            f"--profile {CHAIN_PROFILE}` -> exit {code}"
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
        say(
            f"{INDENT}  on chain    ReceiptAnchor {onchain.get('receipt_anchor', '?')}, "
            f"block {onchain.get('anchored_in_block', '?')}, "
            f"anchored by {onchain.get('anchorer', '?')}"
        )
        if code != 0:
            problems = result.get("problems") or [(err or out).strip()[-300:]]
            raise DemoError(f"on-chain verify failed: {'; '.join(map(str, problems))}")
        return True

    async def run_job(
        self,
        c: CoordinatorClient,
        outcome: Outcome,
        spec: common_pb2.JobSpec,
        stream: bool = False,
    ) -> coordinator_pb2.Job:
        quote = await c.quote(spec)
        policy = common_pb2.Policy.Name(quote.spec.policy).removeprefix("POLICY_")
        say(
            f"{INDENT}quote    {usd(quote.price.amount_micros)} at {policy} prices; "
            f"{quote.eligible_workers} connected worker"
            f"{'' if quote.eligible_workers == 1 else 's'} can run it"
        )
        job = await c.commit(quote.quote_id)
        p = job.payment
        say(
            f"{INDENT}paid     x402: {usdc(int(p.amount or 0))} authorized by "
            f"{p.payer[:6]}…{p.payer[-4:]}"
            f" on {p.network} ({p.status}; settled once the job completes)"
        )
        say(f"{INDENT}job      {job.job_id} committed, waiting...")
        try:
            follow = self.stream_tokens(c, job.job_id) if stream else c.wait(job.job_id)
            job = await asyncio.wait_for(follow, JOB_TIMEOUT)
        except TimeoutError:
            job = await c.get(job.job_id)
            outcome.job = job
            raise DemoError(f"job still {state_name(job.state)} after {JOB_TIMEOUT:.0f}s") from None
        outcome.job = job
        tries = "attempt" if job.attempts == 1 else "attempts"
        say(f"{INDENT}result   {state_name(job.state)} after {job.attempts} {tries}")
        if job.state != coordinator_pb2.JOB_STATE_COMPLETED:
            failure = f"{job.failure.code}: {job.failure.message}" if job.failure.code else "?"
            raise DemoError(f"job ended {state_name(job.state)} ({failure})")
        say(f"{INDENT}worker   {self.label(job.worker_id)}")
        say(f"{INDENT}output   {output_text(job)}")
        job = await self.settled(c, job)
        outcome.job = job
        say(f"{INDENT}settled  {usdc(int(job.payment.amount))} in {job.payment.transaction}")
        await self.check_receipt(job, outcome)
        return job

    async def settled(self, c: CoordinatorClient, job: coordinator_pb2.Job) -> coordinator_pb2.Job:
        """The job once its payment has left "authorized" (the coordinator settles it on
        chain right after the job completes)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while job.payment.status == "authorized" and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            job = await c.get(job.job_id)
        if job.payment.status != "settled":
            raise DemoError(f"payment still {job.payment.status} after {SETTLE_TIMEOUT:.0f}s")
        return job

    def balances(self) -> tuple[int, int]:
        """Test USDC of the paying client and of the coordinator (the payee), on chain."""
        import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
        from dispatchnet.chains.evm.node import web3_for
        from dispatchnet.chains.evm.payments import token_balance

        w3 = web3_for(str(self.chain["rpc_url"]), 5.0)
        asset = str(self.chain["contracts"]["usdc"])
        return (
            token_balance(w3, asset, self.payer_address),
            token_balance(w3, asset, str(self.chain["accounts"]["coordinator"]["address"])),
        )

    def wallet(self) -> Any:
        """The client's x402 wallet: the deployment's funded "client" dev account."""
        import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
        from dispatchnet.payments.wallet import Wallet

        wallet = Wallet.of_deployment(self.chain, WALLET_LIMIT)
        self.payer_address = wallet.address
        return wallet

    def show_payments(self, before: tuple[int, int], outcomes: list[Outcome]) -> list[str]:
        """Balances before and after, the settlement transactions; problems if they do not
        add up to the jobs' prices."""
        after = self.balances()
        payee = str(self.chain["accounts"]["coordinator"]["address"])
        say(f"{INDENT}{'':8}{'before':>20}{'after':>20}")
        say(f"{INDENT}{'payer':8}{usdc(before[0]):>20}{usdc(after[0]):>20}  {self.payer_address}")
        say(f"{INDENT}{'payee':8}{usdc(before[1]):>20}{usdc(after[1]):>20}  {payee} (coordinator)")
        paid = 0
        for o in outcomes:
            if o.job is not None and o.job.payment.status == "settled":
                p = o.job.payment
                paid += int(p.amount)
                say(f"{INDENT}{o.title:22} {usdc(int(p.amount))} in {p.transaction}")
        problems = []
        if before[0] - after[0] != paid or after[1] - before[1] != paid:
            problems.append(
                f"balances moved by {before[0] - after[0]} / {after[1] - before[1]}, "
                f"the settled payments add up to {paid}"
            )
        else:
            say(f"{INDENT}the payer paid exactly the {usdc(paid)} its settled jobs cost, once each")
        return problems

    async def stream_tokens(self, c: CoordinatorClient, job_id: str) -> coordinator_pb2.Job:
        """Follows WatchJob, printing the tokens the worker streams as they arrive."""
        started = False
        async for item in c.watch(job_id):
            if item.event.HasField("progress"):
                if not started:
                    print(f"{INDENT}tokens   ", end="", flush=True)
                    started = True
                print(item.event.progress.text.replace("\n", " "), end="", flush=True)
            if item.HasField("job"):
                if started:
                    print(flush=True)
                return item.job
        return await c.get(job_id)

    async def check_receipt(self, job: coordinator_pb2.Job, outcome: Outcome) -> None:
        problems: list[str] = []
        if not job.HasField("receipt"):
            problems.append("the job has no receipt")
        else:
            v = verify_receipt_message(job.receipt, self.coordinator_key)
            problems += v.problems
            if v.body is not None:
                if v.body.job_id != job.job_id:
                    problems.append("the receipt is for another job")
                if v.body.worker_public_key.hex() != job.worker_id:
                    problems.append("the receipt was signed by another worker")
        in_process = "valid" if not problems else "INVALID"

        path = self.tmp / f"{job.job_id}.json"
        path.write_text(json.dumps(job_json(job), indent=2) + "\n")
        code, out, err = await self.run_cli(
            "receipt", "verify", str(path), "--coordinator-key", self.coordinator_key.hex()
        )
        offline = "exit 0" if code == 0 else f"exit {code}"
        if code != 0:
            detail = err.strip() or out.strip()
            problems.append(f"`dispatch receipt verify` exited {code}: {detail[-300:]}")
        say(f"{INDENT}receipt  {in_process}: worker and coordinator signatures checked in-process")
        say(f"{INDENT}         offline: `dispatch receipt verify {path.name}` -> {offline}")
        outcome.receipt_valid = not problems
        outcome.problems += problems

    async def public_task(self, c: CoordinatorClient, outcome: Outcome) -> None:
        text = "Dispatch sends small jobs to phones and desktops, and signs a receipt for each"
        await self.run_job(
            c, outcome, task_spec("word_count", json.dumps(text).encode(), common_pb2.POLICY_CHEAP)
        )

    async def public_llm(self, c: CoordinatorClient, outcome: Outcome) -> None:
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

    async def private_task(self, c: CoordinatorClient, outcome: Outcome) -> None:
        owner = self.workers[0]
        code = await c.create_pairing_code()
        say(f"{INDENT}pairing  client created code {code.code}")
        rc, out, err = await self.run_cli(
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
            f"{INDENT}         -> {pairing.get('pairing_id')}: client {short(c.key.public_hex)}"
            f" <-> {owner.label} ({short(owner.worker_id)})"
        )
        data = json.dumps({"note": "for my own devices only"}).encode()
        job = await self.run_job(
            c, outcome, task_spec("echo", data, common_pb2.POLICY_AUTO, private=True)
        )
        if job.worker_id == owner.worker_id:
            say(f"{INDENT}check    ran on the paired worker {owner.label}: ok")
        else:
            outcome.problems.append(
                f"the private job ran on {self.label(job.worker_id)}, not on {owner.label}"
            )
            say(f"{INDENT}check    ran on {self.label(job.worker_id)}, NOT the paired worker")


def summary(outcomes: list[Outcome], labeler: Callable[[str], str]) -> None:
    rows = [("Scenario", "Job id", "State", "Worker", "Price", "Payment", "Tries", "Receipt")]
    for o in outcomes:
        j = o.job
        rows.append(
            (
                o.title,
                j.job_id if j else "-",
                state_name(j.state) if j else "-",
                labeler(j.worker_id) if j else "-",
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
                say(f"  ! {o.title}: {p}")


async def run_demo() -> int:
    """Runs the demo; 0 when every scenario completed on the right worker with a valid receipt,
    the feedback reached the chain and a receipt checked out on chain."""
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-demo-"))
    demo = Demo(tmp)
    outcomes: list[Outcome] = []
    step_total = 11
    say(
        "Dispatch demo: a local chain, a coordinator, two seekers, a desktop and a client, "
        "all on this machine"
    )
    say(f"(scratch space: {tmp}, removed at the end; DISPATCH_HOME={tmp / 'home'})")
    try:
        try:
            say(f"\n[1/{step_total}] Starting the local chain (anvil + Dispatch's contracts)")
            await demo.chain_up()
            say(f"\n[2/{step_total}] Starting a coordinator on {CHAIN_PROFILE}")
            await demo.start_coordinator()
            say(f"\n[3/{step_total}] Registering the workers as ERC-8004 agents")
            await demo.register_workers()
            say(f"\n[4/{step_total}] Starting workers: 2 seekers (phones) and 1 desktop")
            await demo.start_workers()
        except (DemoError, OSError, ValueError) as e:
            say(f"{INDENT}FAILED: {e}")
            demo.print_logs()
            return 1
        except grpc.aio.AioRpcError as e:
            say(f"{INDENT}FAILED: {e.code().name}: {e.details()}")
            demo.print_logs()
            return 1

        scenarios: list[
            tuple[str, str, Callable[[CoordinatorClient, Outcome], Awaitable[None]]]
        ] = [
            (
                "public fast LLM",
                "a summary by the desktop's embedded model, tokens streamed live",
                demo.public_llm,
            ),
            (
                "public cheap task",
                "word_count at CHEAP policy (matching favours seekers)",
                demo.public_task,
            ),
            (
                "private task",
                "echo that only a worker paired with the client may run",
                demo.private_task,
            ),
        ]
        first = 5
        wallet = demo.wallet()
        before = demo.balances()
        async with CoordinatorClient(demo.address, demo.client_key, wallet) as client:
            say(
                f"\nThe client is just an ed25519 key ({short(demo.client_key.public_hex)});"
                " the jobs it commits belong to it. It pays for each with x402 from the wallet"
                f" {wallet.address}: {usdc(before[0])} of test USDC, at most"
                f" {usd(WALLET_LIMIT)} per job."
            )
            for n, (title, what, play) in enumerate(scenarios, start=first):
                say(f"\n[{n}/{step_total}] Scenario {n - first + 1}, {title}: {what}")
                outcome = Outcome(title)
                outcomes.append(outcome)
                try:
                    await play(client, outcome)
                except (DemoError, OSError, ValueError) as e:
                    outcome.problems.append(str(e))
                    say(f"{INDENT}FAILED: {e}")
                except grpc.aio.AioRpcError as e:
                    outcome.problems.append(f"{e.code().name}: {e.details()}")
                    say(f"{INDENT}FAILED: {e.code().name}: {e.details()}")

        chain_problems: list[str] = []
        say(f"\n[8/{step_total}] Payments: test USDC on chain, before and after")
        try:
            chain_problems += demo.show_payments(before, outcomes)
        except (DemoError, OSError, ValueError) as e:
            chain_problems.append(str(e))
            say(f"{INDENT}FAILED: {e}")
        say(f"\n[9/{step_total}] Reputation after the coordinator's on-chain feedback")
        try:
            await demo.reputation_after(outcomes)
        except (DemoError, OSError, ValueError) as e:
            chain_problems.append(str(e))
            say(f"{INDENT}FAILED: {e}")
        except grpc.aio.AioRpcError as e:
            chain_problems.append(f"{e.code().name}: {e.details()}")
            say(f"{INDENT}FAILED: {e.code().name}: {e.details()}")
        say(f"\n[10/{step_total}] A receipt checked on chain (its batch root is anchored)")
        anchored = next((o.job for o in outcomes if o.ok and o.job is not None), None)
        try:
            if anchored is None:
                raise DemoError("no completed job to check")
            await demo.verify_onchain(anchored)
        except (DemoError, OSError, ValueError) as e:
            chain_problems.append(str(e))
            say(f"{INDENT}FAILED: {e}")

        say(f"\n[{step_total}/{step_total}] Summary")
        summary(outcomes, demo.label)
        for p in chain_problems:
            say(f"  ! chain: {p}")
        ok = bool(outcomes) and all(o.ok for o in outcomes) and not chain_problems
        if not ok:
            demo.print_logs()
        say(
            "\nAll scenarios completed and were paid for on chain, with valid receipts, feedback"
            " on chain and an anchored receipt verified on chain."
            if ok
            else "\nThe demo FAILED (see above)."
        )
        return 0 if ok else 1
    finally:
        await demo.stop_all()
        await demo.chain_down()
        shutil.rmtree(tmp, ignore_errors=True)
