"""The SQLite writer in a process of its own (`[server] sqlite_writer = "process"`), and the
group commit both writers share.

Why a process: the writer thread shares the coordinator's interpreter lock with the event
loop. The sqlite3 module lets go of the lock around every statement it runs and must take
it back afterwards; while the loop is busy, each of those takes waits for it. Measured
under RunJob load (64 submitters, 2 cores): a group of ~25 writes took ~15 ms on the
writer thread for ~5 ms of its CPU, and the thread was never idle, so it set the pace of
every job. The same statements in a process of their own run at their CPU cost.

The event loop drives the child itself (LoopWriter), with no thread in between. One group
is out at a time, as on the writer thread: the writes that wait meanwhile go to the
child's stdin together as the next frame (the Store methods to call, by name, with their
arguments), and the loop reads the outcomes from its stdout. The child runs what a frame
holds as one group (at most max_group writes each) in one transaction, exactly as the
writer thread does (run_group), and answers with one frame of outcomes once COMMIT has
returned. So a write is still acknowledged only
after the transaction holding it committed, and the loop never waits on SQLite.

Frames: a 4-byte big-endian length, then a pickle. The child's first frame says whether
its database opened (the schema migrated). It runs until its stdin ends (the coordinator
closed it, or ended), then closes its connection and exits; it ignores SIGINT and
SIGTERM, so a Ctrl-C to the coordinator's terminal or a stop of its whole process group
lets the coordinator finish what is queued first.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

from dispatchnet.errors import Unavailable
from dispatchnet.memory import young_collections_every
from dispatchnet.store.sqlite import SqliteStore

Call = tuple[str, tuple[Any, ...], dict[str, Any]]  # a SqliteStore method, its arguments
Outcome = tuple[bool, Any]  # (True, what it returned) or (False, what it raised)

MAX_FRAME_BYTES = 1 << 30
# At most this much per read of a pipe. Below glibc's mmap threshold (128 KiB): os.read
# allocates its whole size, and a 1 MiB read cost an mmap, an mremap to the bytes read and
# an munmap: ~15 us per read against ~1 us (a read on each side of every group).
READ_BYTES = 1 << 16
EXIT_SECONDS = 30.0  # for the child to exit once its input is closed


# --- the group commit (both writers) --------------------------------------------------


def run_group(store: SqliteStore, fns: Sequence[Callable[[SqliteStore], Any]]) -> list[Outcome]:
    """Runs writes in one transaction, each in its own savepoint, so one that raises undoes
    only its own changes and gets its own error (a write alone runs as SqliteStore runs
    it). When BEGIN or COMMIT fails, or SQLite rolled the whole transaction back (an I/O
    error, a full disk), every write of the group gets that error: nothing of it is kept."""
    if len(fns) == 1:
        return [run_one(fns[0], store)]
    try:
        store.begin_group()
    except Exception as e:
        return [(False, e)] * len(fns)
    outcomes: list[Outcome] = []
    lost: Exception | None = None  # why nothing of the group was kept
    for fn in fns:
        try:
            with store.group_op():
                value = fn(store)
        except Exception as e:
            outcomes.append((False, e))
        else:
            outcomes.append((True, value))
        if not store.group_open:  # SQLite rolled it back whole (I/O error, full disk)
            ok, error = outcomes[-1]
            lost = error if not ok else RuntimeError("the group's transaction was rolled back")
            break
    try:
        store.end_group(commit=lost is None)
    except Exception as e:
        lost = e
    return [
        outcomes[i] if i < len(outcomes) and (lost is None or not outcomes[i][0]) else (False, lost)
        for i in range(len(fns))
    ]


def run_one(fn: Callable[[SqliteStore], Any], store: SqliteStore) -> Outcome:
    """fn's outcome on store, what it raised included."""
    try:
        return True, fn(store)
    except Exception as e:
        return False, e


# --- frames -----------------------------------------------------------------------------


def send(stream: IO[bytes], obj: object) -> None:
    send_pickled(stream, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def send_pickled(stream: IO[bytes], data: bytes) -> None:
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def encode_error(e: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    """An exception as (class, args, attributes): rebuilt by decode_error without calling
    its __init__ (TooManyOpenJobs(limit) would format its message twice), so its message
    and attributes come back as they were. An exception that cannot travel so (a class
    that is not importable, an attribute that does not pickle) comes back as a
    RuntimeError with its text."""
    state = (type(e), e.args, dict(getattr(e, "__dict__", {})))
    try:
        pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return (RuntimeError, (f"{type(e).__name__}: {e}",), {})
    return state


def decode_error(
    state: tuple[type[BaseException], tuple[Any, ...], dict[str, Any]],
) -> BaseException:
    cls, args, attributes = state
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(attributes)
    return e


# --- the child --------------------------------------------------------------------------


def _call_of(call: Call) -> Callable[[SqliteStore], Any]:
    name, args, kwargs = call
    if name.startswith("_") or not callable(getattr(SqliteStore, name, None)):
        raise ValueError(f"the writer runs SqliteStore's methods, and {name!r} is not one")
    return lambda store: getattr(store, name)(*args, **kwargs)


def _outcome_frame(outcomes: list[Outcome]) -> bytes:
    """The outcomes as one frame's pickle; a result that does not pickle is sent as the
    RuntimeError it is (looked for only when the whole frame does not pickle)."""
    frame = [(ok, value if ok else encode_error(value)) for ok, value in outcomes]
    try:
        return pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    for i, (ok, value) in enumerate(frame):
        if ok:
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                frame[i] = (False, encode_error(RuntimeError(f"an unpicklable result: {e}")))
    return pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)


def child_main(path: str, synchronous: str, max_group: int, nice: int = 0) -> int:
    # its life is its input's: a signal to the coordinator's process group (Ctrl-C, a
    # service manager's SIGTERM) leaves it to finish what the coordinator still sends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice > 0:
        # Below the event loop's priority ([server] sqlite_writer_nice). The loop is the
        # coordinator's one serial bottleneck; the writer, woken for each group, took
        # the CPU from it (a woken process that slept runs first) and woke for small
        # groups. Niced, it runs when the loop lets go of a core, and what came in
        # meanwhile makes a larger group: RunJob from 64 submitters on 2 cores, ~770 ->
        # ~870 jobs/s, ~2.3 -> ~2.05 ms of CPU per job over all processes, with the same
        # p50 from 1 submitter (idle cores run it at once). CPU priority only: its
        # writes are committed before they are answered, as ever.
        os.nice(nice)
    young_collections_every()
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    try:
        store = SqliteStore(path, synchronous, background_checkpoints=True)
    except Exception as e:
        send(stdout, (False, encode_error(e)))
        return 1
    send(stdout, (True, None))
    frames = FrameBuffer()
    try:
        while True:
            calls: list[Call] = [c for frame in frames.take() for c in frame]
            if not calls:  # nothing whole yet: wait for more
                chunk = os.read(0, READ_BYTES)
                if not chunk:
                    return 0  # the coordinator closed our input (or ended)
                frames.feed(chunk)
                continue
            for start in range(0, len(calls), max_group):  # all that came in, as groups
                send_pickled(
                    stdout, _outcome_frame(_run_calls(store, calls[start : start + max_group]))
                )
    finally:
        store.close()


def _run_calls(store: SqliteStore, calls: list[Call]) -> list[Outcome]:
    fns: list[Callable[[SqliteStore], Any]] = []
    refused: dict[int, Exception] = {}
    for i, call in enumerate(calls):
        try:
            fns.append(_call_of(call))
        except ValueError as e:
            refused[i] = e
    ran = iter(run_group(store, fns) if fns else [])
    return [(False, refused[i]) if i in refused else next(ran) for i in range(len(calls))]


class FrameBuffer:
    """Bytes read from a pipe, cut into the frames they hold."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk

    def take(self) -> list[Any]:
        """Every whole frame received so far, decoded, in order."""
        out = []
        data = self._data
        at = 0
        while len(data) - at >= 4:
            size = int.from_bytes(data[at : at + 4], "big")
            if size > MAX_FRAME_BYTES:
                raise EOFError(f"a frame of {size} bytes: the pipe is out of step")
            if len(data) - at - 4 < size:
                break
            out.append(pickle.loads(data[at + 4 : at + 4 + size]))
            at += 4 + size
        if at:
            del data[:at]
        return out


# --- the coordinator's side -------------------------------------------------------------


class Pending(Protocol):
    """A write waiting for the writer process: the call it makes."""

    @property
    def call(self) -> Call | None: ...


class LoopWriter:
    """The writer process, driven from the event loop that opened the store, with no thread
    in between. One group is out at a time, as on the writer thread: the writes queued
    while the child works on one go out together as the next, one frame (a non-blocking
    write; what the pipe cannot take yet waits for it to drain), and the outcomes are read
    when the loop finds them on the child's output, in the order the writes went out. A
    write while none is out goes in the same turn of the loop.

    A child that ends (killed, out of memory) fails the writes it had taken with
    Unavailable: they may or may not have been committed. The next write starts a new one.
    """

    def __init__(
        self,
        path: str,
        synchronous: str,
        max_group: int,
        loop: asyncio.AbstractEventLoop,
        opened: concurrent.futures.Future[None],
        settle: Callable[[list[Any], list[Outcome]], None],
        nice: int = 0,
    ) -> None:
        self.loop = loop
        self._argv = [
            sys.executable, "-m", "dispatchnet.store.writer_process",
            path, synchronous, str(max_group), str(nice),
        ]  # fmt: skip
        self._opened = opened  # the first child's opening (the schema migrated)
        self._settle = settle
        self._sent: collections.deque[Any] = collections.deque()  # taken by the child
        self._batch: list[Any] = []  # this turn's writes, not sent yet
        self._flush_due = False
        self._drained: asyncio.Future[None] | None = None
        self.writes = self.commits = self.largest_group = 0
        self.deaths = 0  # children that ended under it
        self.died = asyncio.Event()  # set when a child ends, cleared when the next starts
        self.process: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        process = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._w, self._r = process.stdin.fileno(), process.stdout.fileno()
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._out = bytearray()
        self._in = FrameBuffer()
        self._writing = False
        self._open = False
        self._open_error: BaseException | None = None
        self.died.clear()
        self.loop.add_reader(self._r, self._readable)

    @property
    def busy(self) -> bool:
        return bool(self._sent or self._batch)

    def submit(self, op: Pending) -> None:
        """Queues op (on self.loop) for the next frame."""
        self._batch.append(op)
        self.submit_pending()

    def _flush(self) -> None:
        self._flush_due = False
        if self._sent or not self._batch:  # one group at a time: the writes meanwhile
            return  # become the next one
        if self.process is None:
            try:
                self._start()
            except OSError as e:  # e.g. out of file descriptors
                failed, self._batch = self._batch, []
                error = Unavailable(f"the coordinator cannot start its database writer ({e})")
                self._settle(failed, [(False, error)] * len(failed))
                self._check_drained()
                return
        batch, self._batch = self._batch, []
        try:
            data = pickle.dumps([op.call for op in batch], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            batch, data = self._picklable(batch)
            if not batch:
                self._check_drained()
                return
        self._sent.extend(batch)
        self._out += len(data).to_bytes(4, "big") + data
        self._write()

    def _picklable(self, batch: list[Any]) -> tuple[list[Any], bytes]:
        """The writes of batch whose arguments pickle, and their frame; the others fail
        with what pickling raised."""
        kept, failed, errors = [], [], []
        for op in batch:
            try:
                pickle.dumps(op.call, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                failed.append(op)
                errors.append((False, e))
            else:
                kept.append(op)
        if failed:
            self._settle(failed, errors)
        return kept, pickle.dumps([op.call for op in kept], protocol=pickle.HIGHEST_PROTOCOL)

    def _write(self) -> None:
        try:
            written = os.write(self._w, self._out)
        except BlockingIOError:
            written = 0
        except OSError:  # the child is gone, and never had this frame whole
            self._died(unsent=True)
            return
        del self._out[:written]
        if self._out and not self._writing:
            self.loop.add_writer(self._w, self._write)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self._w)
            self._writing = False

    def _readable(self) -> None:
        try:
            chunk = os.read(self._r, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._died()
            return
        self._in.feed(chunk)
        for frame in self._in.take():
            self._frame(frame)

    def _frame(self, frame: Any) -> None:
        if not self._open:  # the child's first frame: did the database open?
            ok, value = frame
            if ok:
                self._open = True
                if not self._opened.done():
                    self._opened.set_result(None)
            else:
                self._open_error = decode_error(value)
                if not self._opened.done():
                    self._opened.set_exception(self._open_error)
            return
        outcomes: list[tuple[bool, Any]] = frame
        ops = [self._sent.popleft() for _ in outcomes]
        self.writes += len(ops)
        self.commits += 1
        self.largest_group = max(self.largest_group, len(ops))
        self._settle(ops, [(ok, v if ok else decode_error(v)) for ok, v in outcomes])
        if not self._sent and self._batch:
            self._flush()
        self._check_drained()

    def _died(self, unsent: bool = False) -> None:
        """The child ended: every write it had fails, unless unsent: the frame being
        written never reached it whole (one group is out at a time, so that frame holds
        all it had), it ran none of it, and those writes go to the next child."""
        process = self._detach()
        if process is None:
            return
        self.deaths += 1
        self.died.set()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        code = process.poll()
        if code is None:  # its output closed first: reap it off the loop
            self.loop.run_in_executor(None, process.wait)
        if unsent and self._open:
            self._batch = [*self._sent, *self._batch]
            self._sent.clear()
            self.submit_pending()
            return
        error = self._open_error or Unavailable(
            f"the coordinator's database writer process ended (exit code {code}) during a "
            "write, which may or may not have been kept; retry"
        )
        if not self._opened.done():
            self._opened.set_exception(error)
        lost = [*self._sent, *self._batch]
        self._sent.clear()
        self._batch = []
        if lost:
            self._settle(lost, [(False, error)] * len(lost))
        self._check_drained()

    def _detach(self) -> subprocess.Popen[bytes] | None:
        """The current child, no longer watched by the loop (None: there is none)."""
        process, self.process = self.process, None
        if process is not None:
            self.loop.remove_reader(self._r)
            if self._writing:
                self.loop.remove_writer(self._w)
                self._writing = False
        return process

    def submit_pending(self) -> None:
        """Sends the writes waiting, if any, at the next turn of the loop."""
        if self._batch and not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._drained.done() and not self.busy:
            self._drained.set_result(None)

    async def close(self) -> None:
        """Waits for the writes queued to be answered, then ends the child's input and
        waits for it to exit (killed if it has not after EXIT_SECONDS)."""
        if self.busy:
            self._drained = self.loop.create_future()
            self._flush()
            await self._drained
        process = self._detach()
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), EXIT_SECONDS)
        except TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)
        process.stdout.close()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
