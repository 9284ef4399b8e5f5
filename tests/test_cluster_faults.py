"""Faults across a cluster (the cluster counterpart of test_faults.py): three coordinator
processes on one PostgreSQL database, payments on (a local anvil), seekers processes given
all three addresses, and a few hundred paid jobs while coordinators are SIGKILLed (and
restarted) and a seekers process is SIGKILLed (and replaced). Every job completes once,
with a receipt countersigned by a coordinator of the cluster, and every payment is settled
exactly once: the store and the chain agree (`dispatch payouts audit`)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
from chain_fixtures import adispatch, chain, chain_profile, home  # noqa: F401  (fixtures)
from conftest import Proc

from dispatch.v1 import coordinator_pb2, receipt_pb2
from dispatchnet.chains import registry
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import profile_toml
from dispatchnet.receipts.core import verify_receipt_message

JOBS = 240  # at least: jobs go on being submitted until the faults are over
SUBMITTERS = 12
PRICE = 1000  # a CHEAP task, micro-USD = test USDC atomic units
COORDINATORS = 3
SEEKERS = ("--count", "8", "--max-concurrency", "2")


def _profile(dispatch_home: Path, tmp: Path) -> Path:
    """local-monad on the test's chain, with fast timings; anchoring and feedback off (the
    payments are what is checked here), no metrics or dashboard ports."""
    text = profile_toml(
        "local-monad",
        {
            "": {"name": "cluster-faults"},
            "jobs": {
                "offer_lease_seconds": 2, "time_limit_seconds": 30, "max_attempts": 10,
                "sweep_interval_seconds": 0.25, "restart_grace_seconds": 2,
                "progress_flush_seconds": 0.2,
            },
            "workers": {"heartbeat_interval_seconds": 1, "eviction_seconds": 5},
            "chain": {"deployment": str(dispatch_home / "chains" / "local-monad.json")},
            "receipts": {"anchor": "none", "batch_max_age_seconds": 1},
            "feedback": {"enabled": False},
            "payments": {"settle_max_wait_seconds": 0.5},
            "observability": {"metrics_listen": "", "dashboard_listen": ""},
        },
    )  # fmt: skip
    path = tmp / "cluster-faults.toml"
    path.write_text(text)
    return path


class Coordinators:
    """The cluster's coordinator processes, each on a fixed address and data dir once
    started (a restart is the same coordinator: same key, same instance id)."""

    def __init__(self, dispatch_home: Path, tmp: Path, profile: Path, url: str) -> None:
        self.home, self.tmp, self.profile, self.url = dispatch_home, tmp, profile, url
        self.procs: list[Proc] = []
        self.addresses: list[str] = []
        self.keys: set[bytes] = set()
        self.starts = 0

    def start(self, i: int, listen: str = "127.0.0.1:0") -> Proc:
        self.starts += 1
        p = Proc(
            ["coordinator", "--profile", str(self.profile), "--listen", listen,
             "--data-dir", str(self.tmp / f"coord{i}"), "--store", self.url],
            self.home, self.tmp / f"coord{i}-{self.starts}.log",
        )  # fmt: skip
        self.keys.add(bytes.fromhex(p.info["coordinator_public_key"]))
        return p

    def up(self) -> None:
        for i in range(COORDINATORS):
            p = self.start(i)
            self.procs.append(p)
            self.addresses.append(p.info["listening"])

    async def kill_and_restart(self, i: int, down_for: float) -> None:
        self.procs[i].kill(signal.SIGKILL)
        await asyncio.sleep(down_for)
        self.procs[i] = await asyncio.to_thread(self.start, i, self.addresses[i])

    def stop(self) -> None:
        for p in self.procs:
            p.kill(signal.SIGTERM)


async def test_three_coordinators_lose_nothing_to_kills_and_settle_each_payment_once(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    pg_url: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    rng = random.Random(14)
    profile_path = _profile(home, tmp_path)
    coords = Coordinators(home, tmp_path, profile_path, pg_url)
    seekers: list[Proc] = []
    paying = chain_profile(str(home / "chains" / "local-monad.json"), payments={})
    wallet = registry.adapter_of(paying).client_wallet(paying, "")  # the dev "client" account
    jobs = 0
    try:
        coords.up()
        everyone = ",".join(coords.addresses)

        def seekers_proc(n: int) -> Proc:
            return Proc(
                ["seekers", "--coordinator", everyone, *SEEKERS, "--seed", str(n)],
                home, tmp_path / f"seekers{n}.log",
            )  # fmt: skip

        seekers += [seekers_proc(0), seekers_proc(1)]
        key = KeyPair.generate()
        finals: dict[str, coordinator_pb2.Job] = {}
        submitted: list[str] = []
        faults_over = asyncio.Event()
        counter = iter(range(10**6))

        async def submitter(n: int) -> None:
            # each client starts at another coordinator: the load is spread
            order = coords.addresses[n % COORDINATORS :] + coords.addresses[: n % COORDINATORS]
            async with CoordinatorClient(order, key, wallet) as c:
                while (j := next(counter)) < JOBS or not faults_over.is_set():
                    spec = task_spec("sleep", json.dumps({"ms": rng.randint(50, 400)}).encode())
                    quote = await c.quote(spec)
                    job = await c.commit(quote.quote_id, f"job-{j}")
                    submitted.append(job.job_id)
                    finals[job.job_id] = await c.wait(job.job_id)

        async def chaos() -> None:
            """Three coordinator kills (each restarted) and a seekers process killed (and
            replaced), under load."""
            for fault in ("coordinator", "seekers", "coordinator", "coordinator"):
                await asyncio.sleep(rng.uniform(1.0, 2.0))
                if fault == "seekers":
                    seekers[0].kill(signal.SIGKILL)  # its jobs go back to the queue
                    seekers.append(await asyncio.to_thread(seekers_proc, 2))
                else:
                    await coords.kill_and_restart(rng.randrange(COORDINATORS), rng.uniform(0.3, 1))
            faults_over.set()

        await asyncio.wait_for(
            asyncio.gather(chaos(), *(submitter(n) for n in range(SUBMITTERS))), 120
        )
        jobs = len(submitted)

        # 0 lost, 0 stuck: every job committed once and completed
        assert jobs >= JOBS and len(set(submitted)) == jobs == len(finals)
        states = [coordinator_pb2.JobState.Name(j.state) for j in finals.values()]
        assert states == ["JOB_STATE_COMPLETED"] * jobs, sorted(set(states))
        for job in finals.values():  # a receipt of this job, from a coordinator of the cluster
            assert verify_receipt_message(job.receipt, coords.keys).valid
            assert receipt_pb2.ReceiptBody.FromString(job.receipt.body).job_id == job.job_id

        db = await asyncpg.connect(pg_url)
        try:
            # 0 duplicated: one job per submission, each completed once
            assert await db.fetchval("SELECT count(*) FROM jobs") == jobs
            twice = await db.fetch(
                "SELECT job_id FROM events WHERE reason = 'completed' "
                "GROUP BY job_id HAVING count(*) <> 1"
            )
            assert not twice
            # every payment settled, once
            deadline = time.monotonic() + 30
            while True:
                rows = await db.fetch("SELECT status, count(*) AS n FROM payments GROUP BY status")
                by_status = {r["status"]: r["n"] for r in rows}
                if by_status == {"settled": jobs} or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert by_status == {"settled": jobs}
        finally:
            await db.close()
        code, out, err = await adispatch(
            home, "payouts", "audit", "--profile", str(profile_path), "--store", pg_url,
            "--coordinator-data", str(tmp_path / "coord0"),
        )  # fmt: skip
        assert code == 0, out + err
        [report] = json.loads(out)["networks"]
        [totals] = report["assets"].values()
        assert totals["settled_in"] == jobs * PRICE and totals["refunded"] == 0
        assert totals["chain_change"] == totals["expected_change"]
    finally:
        for p in seekers:
            p.kill(signal.SIGKILL)
        coords.stop()
    print(f"cluster faults: {jobs} jobs, {time.monotonic() - started:.1f}s")
