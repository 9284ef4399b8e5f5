"""`dispatch bench` (`make bench`): measured numbers, not asserted ones.

Starts a local chain (anvil with the contracts, in a temporary DISPATCH_HOME), a
coordinator on local-monad (payments on) and seekers in this process, then runs paid
CHEAP tasks from one client, a few at a time, and prints:

- x402.verify: the facilitator's verification at CommitJob (signature, balance, simulation)
- x402.settle: the on-chain settlement after a job completes (transferWithAuthorization
  sent and its receipt awaited)
- commit: a paid CommitJob as the client sees it (quote refused, payment signed, retried)
- job: commit to completed, as the client sees it

Latencies come from the coordinator's in-process metrics (dispatchnet.metrics) and from
the client's clock; they are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from dispatchnet import keys
from dispatchnet.metrics import METRICS, Metrics

WORKERS = 2
CONCURRENCY = 4


async def run_bench(jobs: int = 40) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    old_home = os.environ.get("DISPATCH_HOME")
    os.environ["DISPATCH_HOME"] = str(tmp / "home")
    # heavy imports only here (web3, x402)
    import dispatchnet.chains  # noqa: F401  (before web3: restores the recursion limit)
    from dispatchnet.client import CoordinatorClient, task_spec
    from dispatchnet.devchain.local_chain import chain_down, chain_up
    from dispatchnet.payments.wallet import Wallet
    from dispatchnet.profiles import load_profile
    from dispatchnet.server import start_coordinator
    from dispatchnet.worker.runtime import Worker

    profile = load_profile("local-monad").with_overrides(
        receipts={"anchor": "none"}, feedback={"enabled": False}
    )
    client_side = Metrics()
    for name in ("dispatch", "dispatchnet", "x402"):  # the numbers, not the chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"dispatch bench: {jobs} paid CHEAP tasks on a local anvil, {CONCURRENCY} at a time")
    try:
        chain = await asyncio.to_thread(chain_up, profile, 0)
        coord = await start_coordinator(profile, tmp / "coord", "127.0.0.1:0")
        address = f"127.0.0.1:{coord.port}"
        workers = [Worker(address, keys.KeyPair.generate(), kind="seeker") for _ in range(WORKERS)]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            for w in workers:
                await asyncio.wait_for(w.connected.wait(), 20)
            wallet = Wallet.of_deployment(chain, profile.wallet.max_per_job_micros)
            METRICS.reset()
            async with CoordinatorClient(address, keys.KeyPair.generate(), wallet) as c:
                gate = asyncio.Semaphore(CONCURRENCY)
                settled: list[str] = []

                async def one(n: int) -> None:
                    async with gate:
                        spec = task_spec("sha256", f"job {n}".encode())
                        quote = await c.quote(spec)
                        started = time.perf_counter()
                        with client_side.timed("commit"):
                            job = await c.commit(quote.quote_id)
                        job = await c.wait(job.job_id)
                        client_side.observe("job", time.perf_counter() - started)
                        while job.payment.status == "authorized":
                            await asyncio.sleep(0.05)
                            job = await c.get(job.job_id)
                        settled.append(job.payment.status)

                wall = time.perf_counter()
                await asyncio.gather(*(one(n) for n in range(jobs)))
                wall = time.perf_counter() - wall
            print(f"  {jobs} jobs committed, run and settled in {wall:.2f}s")
            print(f"  payments: {settled.count('settled')} settled, {len(settled)} in all")
            for summary in [*METRICS.summaries(), *client_side.summaries()]:
                print("  " + summary.line())
        finally:
            for w in workers:
                w.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await coord.stop()
        return 0 if settled.count("settled") == jobs else 1
    finally:
        await asyncio.to_thread(chain_down, profile)
        if old_home is None:
            os.environ.pop("DISPATCH_HOME", None)
        else:
            os.environ["DISPATCH_HOME"] = old_home
        shutil.rmtree(tmp, ignore_errors=True)
