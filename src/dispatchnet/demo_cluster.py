"""`make demo-cluster` (`dispatch demo --cluster`): the demo's three scenarios (public fast
LLM, public cheap task, private task) on the EVM track (local anvil, x402 payments,
ERC-8004 agents) across a local cluster: a throwaway PostgreSQL and three coordinators
sharing it (cluster.py), the workers spread over them (each given all three addresses, each
starting at another), and the client's SDK network listing all three. While the desktop
generates the LLM answer, its coordinator is SIGKILLed: the desktop reconnects to the next
coordinator and resumes the job there, the client's watch follows it there, and the job
completes once, paid once, with a receipt countersigned by the coordinator that took it
over. The end checks every job completed exactly once (one "completed" event each).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from dispatch.v1 import coordinator_pb2, receipt_pb2
from dispatchnet import keys
from dispatchnet.client import CoordinatorClient
from dispatchnet.cluster import LocalCluster
from dispatchnet.demo import (
    INDENT,
    STEP_ERRORS,
    TRACKS,
    Client,
    DemoError,
    HostedStandIn,
    Outcome,
    TrackRun,
    quiet_chain_clients,
    say,
    short,
    summary,
)

COORDINATORS = 3
DOOMED = 2  # the coordinator killed mid-run: the desktop's first (it is worker 2)
KILL_WAIT = 20.0  # longest wait for the LLM job to run on the doomed coordinator


class ClusterRun(TrackRun):
    """The EVM track on a cluster of coordinators; see the module docstring."""

    cluster: LocalCluster | None = None
    killed: str = ""

    def worker_coordinators(self, n: int) -> str:
        addresses = self.address.split(",")
        k = n % len(addresses)
        return ",".join(addresses[k:] + addresses[:k])  # worker n starts at coordinator n

    def client_coordinators(self) -> list[str]:
        addresses = self.address.split(",")  # the client starts where the kill will be
        return addresses[DOOMED:] + addresses[:DOOMED]

    def which(self, key: bytes) -> str:
        assert self.cluster is not None
        for m in self.cluster.members:
            if m.public_key == key.hex():
                return f"coordinator {m.index} ({m.address})"
        return "an unknown coordinator"

    async def start_coordinator(self) -> None:
        cluster = LocalCluster(
            str(self.coordinator_profile), self.dir / "cluster", COORDINATORS, self.procs.env
        )
        self.cluster = await cluster.__aenter__()
        self.address = ",".join(cluster.addresses)
        keys_ = [bytes.fromhex(m.public_key) for m in cluster.members]
        self.coordinator_key, self.cluster_keys = keys_[0], keys_[1:]
        assert cluster.postgres is not None
        say(f"{INDENT}PostgreSQL {cluster.store_url} (initdb + pg_ctl, a throwaway cluster)")
        for m in cluster.members:
            say(f"{INDENT}coordinator {m.index}  {m.address}  key {m.public_key[:16]}...")
        say(
            f"{INDENT}(`dispatch cluster up --coordinators {COORDINATORS}` starts the same by "
            "hand); workers and the client get all three addresses and fail over"
        )

    async def public_llm(self, c: Client, outcome: Outcome) -> None:
        killer = asyncio.create_task(self.kill_mid_job())
        try:
            await super().public_llm(c, outcome)
        finally:
            if not killer.done():
                killer.cancel()
        if outcome.job is not None:
            body = receipt_pb2.ReceiptBody.FromString(outcome.job.receipt.body)
            say(
                f"{INDENT}failover the job was taken over after {self.killed or 'no kill'}; "
                f"its receipt is countersigned by {self.which(body.coordinator_public_key)}"
            )

    async def kill_mid_job(self) -> None:
        """SIGKILLs coordinator DOOMED once the desktop (connected to it) runs a job."""
        assert self.cluster is not None
        desktop = next(w for w in self.workers if w.kind == "desktop")
        address = self.cluster.members[DOOMED].address
        began = time.monotonic()
        async with CoordinatorClient(address, keys.KeyPair.generate()) as c:
            while time.monotonic() - began < KILL_WAIT:
                busy = {w.worker_id: w.active_jobs for w in await c.list_workers()}
                if busy.get(desktop.worker_id):
                    break
                await asyncio.sleep(0.05)
        self.cluster.kill(DOOMED)
        self.killed = f"SIGKILL of coordinator {DOOMED} ({address}) mid-job"
        say(f"\n{INDENT}!!! {self.killed}: its workers and the client move on")

    async def play_scenarios(self) -> None:
        await super().play_scenarios()
        try:
            await self.check_once()
        except STEP_ERRORS as e:
            self.failed(e, self.problems)

    async def check_once(self) -> None:
        """Every job of the run has exactly one "completed" event (read through the
        cluster, failing over past the dead coordinator)."""
        jobs = [o.job for o in self.outcomes if o.job is not None]
        async with CoordinatorClient(self.client_coordinators(), self.client_key) as c:
            for job in jobs:
                reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
                completed = reasons.count("completed")
                final = await c.get(job.job_id)
                if completed != 1 or final.state != coordinator_pb2.JOB_STATE_COMPLETED:
                    raise DemoError(f"job {job.job_id} completed {completed} times")
        say(
            f"\n{INDENT}once     each of the {len(jobs)} jobs completed exactly once "
            f"(one `completed` event each), paid once, receipts valid: "
            + ", ".join(short(j.job_id) for j in jobs)
        )

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.procs.stop_all()  # the workers
        if self.cluster is not None:
            await self.cluster.stop()
        await self.chain_down()


async def run_cluster_demo() -> int:
    """The EVM track's scenarios across three coordinators, one killed mid-run; 0 when
    every scenario completed once, paid, with a valid receipt (see TrackRun.ok)."""
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-demo-cluster-"))
    env = {**os.environ, "DISPATCH_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("DISPATCH_COORDINATOR", None)
    track = next(t for t in TRACKS if t.profile == "local-monad")
    run = ClusterRun(track, tmp, env, keys.load_or_create(tmp / "client.key"))
    say(
        f"Dispatch cluster demo: {COORDINATORS} coordinators sharing one PostgreSQL, the "
        f"{track.name} track on {track.profile}; one coordinator is killed mid-run"
    )
    stand_in = HostedStandIn(tmp, env)
    try:
        run.hosted = await stand_in.ready()
        with quiet_chain_clients():
            await run.play()
        say("\nSummary")
        summary([run])
        say(
            "\nEvery job completed once, paid once, with a valid receipt, across a coordinator "
            "crash."
            if run.ok
            else "\nThe cluster demo FAILED (see above)."
        )
        return 0 if run.ok else 1
    finally:
        await run.stop()
        stand_in.stop()
        shutil.rmtree(tmp, ignore_errors=True)
