"""Payment verification in child processes (`[payments] verify_processes`).

Verifying an x402 payment is CPU work (EIP-712 hashing, signature recovery, ABI encoding
and a JSON-RPC round trip through the x402 SDK) that holds the interpreter lock, so in the
coordinator's process it competes with the event loop and the store's threads. With
`verify_processes = N` (N > 0) the coordinator starts N child processes, each building the
same payment gateway from the profile, and a CommitJob's verification runs in one of them.
Nothing else moves: parsing, the replay check, settlement and refunds stay in the
coordinator.

Each child holds one end of a socket pair; the event loop writes requests to it and reads
the answers as they come (length-prefixed pickles, tagged with a request id, several in
flight per child), so a verification costs the coordinator no thread: no worker thread
waiting on a future, no pool's feeder and manager threads. A child that dies is replaced
(the CommitJobs it was verifying answer UNAVAILABLE, the client retries); when the
coordinator dies its children read the end of their socket and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import socket
import struct
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.payments.service import PaymentGateway, WrappingGateway
from dispatchnet.profiles import Profile

log = logging.getLogger(__name__)

# How long a CommitJob waits for a child's answer before it is UNAVAILABLE (a verification
# is a few chain calls, each bounded by the profile's RPC timeout).
VERIFY_TIMEOUT_SECONDS = 60.0
_FRAME = struct.Struct("!I")  # a frame: its length, then a pickle


def _answer(gateway: Any, payment: Payment | None) -> tuple[str, str, str]:
    """In a child: ("ok", "", ""), or the refusal as (kind, message, reason); exceptions
    travel as plain tuples (the error classes carry keyword fields pickling would lose).
    No payment: a readiness probe."""
    if payment is None:
        return "ok", "", ""
    try:
        gateway.verify(payment)
    except PaymentRequired as e:
        return "refused", e.message, e.reason
    except InvalidArgument as e:
        return "invalid", e.message, ""
    except Unavailable as e:
        return "unavailable", e.message, ""
    return "ok", "", ""


def _child_main(sock: socket.socket, profile: Profile, data_dir: str) -> None:
    """A verifier child: answers (request id, payment) frames in order until the
    coordinator's end closes."""
    from dispatchnet.payments.x402 import gateway_for

    logging.basicConfig(level=logging.WARNING)
    gateway = gateway_for(profile, Path(data_dir))
    with sock, sock.makefile("rb") as reader, sock.makefile("wb") as writer:
        while True:
            head = reader.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return  # the coordinator is gone
            (size,) = _FRAME.unpack(head)
            request_id, payment = pickle.loads(reader.read(size))
            try:
                answer = _answer(gateway, payment)
            except Exception as e:  # a bug in a gateway: refuse this one, keep serving
                log.exception("verifying a payment failed")
                answer = ("unavailable", f"payment verification failed: {e}", "")
            data = pickle.dumps((request_id, answer))
            writer.write(_FRAME.pack(len(data)) + data)
            writer.flush()


class _Child:
    """One verifier process and the coordinator's end of its socket."""

    def __init__(self, profile: Profile, data_dir: Path) -> None:
        ours, theirs = socket.socketpair()
        # not fork: the coordinator has threads (gRPC, the store's)
        context = multiprocessing.get_context("spawn")
        self.process: BaseProcess = context.Process(
            target=_child_main,
            args=(theirs, profile, str(data_dir)),
            name="dispatch-verifier",
            daemon=True,
        )
        self.process.start()
        theirs.close()
        self.sock = ours
        self.pending: dict[int, asyncio.Future[tuple[str, str, str]]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.reading: asyncio.Task[None] | None = None

    async def connect(self) -> asyncio.StreamWriter:
        """The socket as a stream on the running loop (once), with a task reading answers."""
        if self.writer is None:
            reader, self.writer = await asyncio.open_connection(sock=self.sock)
            self.reading = asyncio.create_task(self._read(reader), name="verifier-answers")
        return self.writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                request_id, answer = pickle.loads(await reader.readexactly(size))
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except (asyncio.IncompleteReadError, OSError):
            pass  # the child died or was stopped
        finally:
            self.fail_pending()

    def fail_pending(self) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    Unavailable("the payment verifier restarted; retry the CommitJob")
                )

    @property
    def broken(self) -> bool:
        return self.reading is not None and self.reading.done()

    def close(self) -> None:
        """Stops the child. Callable from any thread: the loop's reader then reads the
        socket's end and fails what was in flight."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.writer is None:
            self.sock.close()
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)


def _dead(child: _Child) -> bool:
    return child.broken or not child.process.is_alive()


class ProcessVerifyingGateway(WrappingGateway):
    """A PaymentGateway whose verify_async() runs in child processes (see the module);
    everything else is `inner`'s, and so is the blocking verify() (for callers in
    threads: it verifies in this process)."""

    def __init__(
        self, inner: PaymentGateway, profile: Profile, data_dir: Path, processes: int
    ) -> None:
        if processes < 1:
            raise ValueError("verify_processes must be at least 1 to verify in processes")
        super().__init__(inner)
        self.profile = profile
        self.data_dir = data_dir
        self.processes = processes
        self.children: list[_Child] = []
        self._ids = itertools.count(1)
        self._replacing = asyncio.Lock()

    def describe(self) -> str:
        return f"{self.inner.describe()}; verified in {self.processes} process(es)"

    def start(self) -> None:
        """Starts the children now (each imports web3 and the x402 SDK: a second or two),
        so the first paid CommitJob does not wait for that."""
        while len(self.children) < self.processes:
            self.children.append(_Child(self.profile, self.data_dir))

    async def _child(self) -> _Child:
        """The live child with the fewest verifications in flight; a dead one is replaced
        (started in a thread: spawning a process takes milliseconds), once, however many
        CommitJobs find it dead at the same time."""
        if len(self.children) < self.processes or any(map(_dead, self.children)):
            async with self._replacing:
                for i, child in enumerate(self.children):
                    if _dead(child):
                        child.close()
                        if child.writer is not None:
                            child.writer.close()
                        log.warning("a payment verifier process died; starting a new one")
                        self.children[i] = await asyncio.to_thread(
                            _Child, self.profile, self.data_dir
                        )
                if len(self.children) < self.processes:
                    await asyncio.to_thread(self.start)
        return min(self.children, key=lambda c: len(c.pending))

    async def ask(self, payment: Payment | None) -> tuple[str, str, str]:
        """One child's answer about payment (None: whether a child answers at all)."""
        child = await self._child()
        writer = await child.connect()
        if child.broken:  # it died while connecting; the next call replaces it
            raise Unavailable("the payment verifier restarted; retry the CommitJob")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        child.pending[request_id] = future
        data = pickle.dumps((request_id, payment))
        writer.write(_FRAME.pack(len(data)) + data)
        try:
            return await asyncio.wait_for(future, VERIFY_TIMEOUT_SECONDS)
        except TimeoutError:
            raise Unavailable("payment verification took too long; retry the CommitJob") from None
        finally:
            child.pending.pop(request_id, None)

    async def verify_async(self, payment: Payment) -> None:
        kind, message, reason = await self.ask(payment)
        if kind == "refused":
            raise PaymentRequired(message, reason=reason)
        if kind == "invalid":
            raise InvalidArgument(message)
        if kind == "unavailable":
            raise Unavailable(message)

    def close(self) -> None:
        children, self.children = self.children, []
        for child in children:
            with contextlib.suppress(Exception):
                child.close()
        self.inner.close()
