"""The SQLite writer in a process of its own (`[server] sqlite_writer = "process"`), and the
group commit both writers share.

Why a process: the writer thread shares the coordinator's interpreter lock with the event
loop. The sqlite3 module lets go of the lock around every statement it runs and must take
it back afterwards; while the loop is busy, each of those takes waits for it. Measured
under RunJob load (64 submitters, 2 cores): a group of ~25 writes took ~15 ms on the
writer thread for ~5 ms of its CPU, and the thread was never idle, so it set the pace of
every job. The same statements in a process of their own run at their CPU cost.

Each group goes to the child as one frame: the Store methods to call, by name, with their
arguments (pickled); the child runs them in one transaction, exactly as the writer thread
does (run_group), and answers with one frame of outcomes once COMMIT has returned. So a
write is still acknowledged only after the transaction holding it committed.

Frames: a 4-byte big-endian length, then a pickle. The child's first frame says whether
its database opened (the schema migrated). It reads groups from stdin and writes outcomes
to stdout until stdin ends (the coordinator closed it, or ended), then closes its
connection and exits; it ignores SIGINT, so a Ctrl-C to the coordinator's terminal lets
the coordinator finish what is queued before the child goes.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from dispatchnet.store.sqlite import SqliteStore

Call = tuple[str, tuple[Any, ...], dict[str, Any]]  # a SqliteStore method, its arguments
Outcome = tuple[bool, Any]  # (True, what it returned) or (False, what it raised)

MAX_FRAME_BYTES = 1 << 30


# --- the group commit (both writers) --------------------------------------------------


def run_group(store: SqliteStore, fns: Sequence[Callable[[SqliteStore], Any]]) -> list[Outcome]:
    """Runs writes in one transaction, each in its own savepoint, so one that raises undoes
    only its own changes and gets its own error (a write alone runs as SqliteStore runs
    it). When BEGIN or COMMIT fails, or SQLite rolled the whole transaction back (an I/O
    error, a full disk), every write of the group gets that error: nothing of it is kept."""
    if len(fns) == 1:
        return [_run(fns[0], store)]
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


def _run(fn: Callable[[SqliteStore], Any], store: SqliteStore) -> Outcome:
    try:
        return True, fn(store)
    except Exception as e:
        return False, e


# --- frames -----------------------------------------------------------------------------


def send(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next frame's object; EOFError when the stream ended (between or within frames)."""
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError("the writer's pipe closed")
    size = int.from_bytes(head, "big")
    if size > MAX_FRAME_BYTES:
        raise EOFError(f"a frame of {size} bytes: the pipe is out of step")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the writer's pipe closed within a frame")
    return pickle.loads(data)


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


def _outcome_frame(outcomes: list[Outcome]) -> list[tuple[bool, Any]]:
    out: list[tuple[bool, Any]] = []
    for ok, value in outcomes:
        if not ok:
            out.append((False, encode_error(value)))
            continue
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            out.append((False, encode_error(RuntimeError(f"an unpicklable result: {e}"))))
        else:
            out.append((True, value))
    return out


def child_main(path: str, synchronous: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    try:
        store = SqliteStore(path, synchronous)
    except Exception as e:
        send(stdout, (False, encode_error(e)))
        return 1
    send(stdout, (True, None))
    try:
        while True:
            try:
                calls: list[Call] = receive(stdin)
            except EOFError:
                return 0
            fns: list[Callable[[SqliteStore], Any]] = []
            refused: dict[int, Exception] = {}
            for i, call in enumerate(calls):
                try:
                    fns.append(_call_of(call))
                except ValueError as e:
                    refused[i] = e
            ran = iter(run_group(store, fns) if fns else [])
            outcomes = [
                (False, refused[i]) if i in refused else next(ran) for i in range(len(calls))
            ]
            send(stdout, _outcome_frame(outcomes))
    finally:
        store.close()


# --- the coordinator's side -------------------------------------------------------------


class WriterChild:
    """One writer process, driven by one thread (the store's writer thread): run() sends a
    group and waits for its outcomes (the thread waits outside the interpreter lock)."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dispatchnet.store.writer_process", path, synchronous],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in, self._out = self.process.stdin, self.process.stdout
        try:
            ok, value = receive(self._out)
        except EOFError:
            self.close()
            code = self.process.returncode
            raise RuntimeError(
                f"the store's writer process ended as it started (exit code {code})"
            ) from None
        if not ok:
            self.close()
            raise decode_error(value)

    def run(self, calls: list[Call]) -> list[Outcome]:
        """The outcome of each call, committed (or refused) as one group. Raises OSError or
        EOFError when the process is gone: whether that group committed is then unknown."""
        send(self._in, calls)
        frame: list[tuple[bool, Any]] = receive(self._out)
        return [(ok, value if ok else decode_error(value)) for ok, value in frame]

    def close(self, timeout: float = 30.0) -> None:
        """Ends its input and waits for it to exit (killed if it has not after timeout)."""
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
