"""SyncComputeRouter: the ComputeRouter for code without an event loop. It runs one of its
own in a background thread; every call blocks until the async call it wraps is done.

    with SyncComputeRouter([Network.from_profile("local")]) as router:
        print(router.run_task("word_count", "to be or not to be").json())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

from dispatchnet.sdk import types
from dispatchnet.sdk.convert import MessageLike, PolicyLike, PrivacyLike
from dispatchnet.sdk.result import ComputeResult
from dispatchnet.sdk.router import CallOptions, ComputeRouter, ComputeStream
from dispatchnet.sdk.verify import ReceiptCheck

T = TypeVar("T")
CANCEL_WAIT_SECONDS = 10.0  # for an interrupted call to cancel its job


class SyncComputeStream:
    """A blocking iterator of a job's output text; `result` once it is exhausted. close()
    (or leaving `with`) before the end cancels the job."""

    def __init__(self, router: SyncComputeRouter, stream: ComputeStream) -> None:
        self._router = router
        self._stream = stream

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return self._router._wait(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    @property
    def result(self) -> ComputeResult:
        return self._stream.result

    def final(self) -> ComputeResult:
        return self._router._wait(self._stream.final())

    def close(self) -> None:
        self._router._wait(self._stream.aclose())

    def __enter__(self) -> SyncComputeStream:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncComputeRouter:
    """ComputeRouter's calls, blocking; takes the same arguments (see ComputeRouter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dispatch-sdk", daemon=True
        )
        self._thread.start()
        self._closed = False

        async def make() -> ComputeRouter:
            return ComputeRouter(*args, **kwargs)  # its channels belong to this loop

        try:
            self.router = self._wait(make())
        except BaseException:
            self._stop()
            raise

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """coro's result, run on the router's loop. Interrupted (Ctrl-C, or another
        exception raised in this thread while it waits), the call is cancelled there and
        given up to CANCEL_WAIT_SECONDS to end, as an async call cancelled would (its job
        cancelled, uncharged, its spending released), before the interruption goes on."""
        if self._closed:
            coro.close()
            raise RuntimeError("the router is closed")
        running: list[asyncio.Task[T]] = []

        async def run() -> T:
            task = asyncio.current_task()
            assert task is not None
            running.append(task)
            return await coro

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():

                def cancel() -> None:  # on the loop
                    # the task itself, so that `future` ends only once its cleanup has
                    # run (cancelling `future` would end it at once); one not started
                    # yet is cancelled through `future`
                    if running:
                        running[0].cancel()
                    else:
                        future.cancel()

                self._loop.call_soon_threadsafe(cancel)
                concurrent.futures.wait([future], timeout=CANCEL_WAIT_SECONDS)
            raise

    def _stop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Closes the router and stops its thread; idempotent."""
        if not self._closed:
            try:
                self._wait(self.router.close())
            finally:
                self._stop()

    def __enter__(self) -> SyncComputeRouter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def client_id(self) -> str:
        return self.router.client_id

    @property
    def spent_micros(self) -> int:
        return self.router.spent_micros

    def run_llm(
        self,
        prompt: str | Sequence[MessageLike],
        *,
        model: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        **options: Unpack[CallOptions],
    ) -> ComputeResult:
        return self._wait(
            self.router.run_llm(
                prompt,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                policy=policy,
                privacy=privacy,
                **options,
            )
        )

    def stream_llm(
        self,
        prompt: str | Sequence[MessageLike],
        *,
        model: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        **options: Unpack[CallOptions],
    ) -> SyncComputeStream:
        async def make() -> ComputeStream:
            return self.router.stream_llm(
                prompt,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                policy=policy,
                privacy=privacy,
                **options,
            )

        return SyncComputeStream(self, self._wait(make()))

    def run_task(
        self,
        name: str,
        input: bytes | str | object = b"",
        *,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        use_llm: bool = False,
        wasm: bytes | None = None,
        verify: int = 0,
        **options: Unpack[CallOptions],
    ) -> ComputeResult:
        return self._wait(
            self.router.run_task(
                name,
                input,
                policy=policy,
                privacy=privacy,
                use_llm=use_llm,
                wasm=wasm,
                verify=verify,
                **options,
            )
        )

    def run(self, spec: types.JobSpec, **options: Unpack[CallOptions]) -> ComputeResult:
        return self._wait(self.router.run(spec, **options))

    def stream(self, spec: types.JobSpec, **options: Unpack[CallOptions]) -> SyncComputeStream:
        async def make() -> ComputeStream:
            return self.router.stream(spec, **options)

        return SyncComputeStream(self, self._wait(make()))

    def quote(self, spec: types.JobSpec, chain: str | None = None) -> types.Quote:
        return self._wait(self.router.quote(spec, chain))

    def verify_receipt(
        self,
        receipt: types.Receipt,
        proof: types.GetReceiptProofResponse | None = None,
        expected_coordinator_key: bytes | Iterable[bytes] = b"",
    ) -> ReceiptCheck:
        return self.router.verify_receipt(receipt, proof, expected_coordinator_key)

    def receipt_proof(
        self, job_id: str, network: str | None = None, wait: float = 0.0
    ) -> types.GetReceiptProofResponse:
        return self._wait(self.router.receipt_proof(job_id, network, wait))

    def get_job(self, job_id: str, network: str | None = None) -> types.Job:
        return self._wait(self.router.get_job(job_id, network))

    def cancel_job(self, job_id: str, network: str | None = None) -> types.Job:
        return self._wait(self.router.cancel_job(job_id, network))

    def list_workers(self, network: str | None = None) -> list[types.WorkerInfo]:
        return self._wait(self.router.list_workers(network))
