"""WebAssembly TASK jobs (task name "wasm"), sandboxed with wasmtime.

A "wasm" job carries a binary WebAssembly module (TaskRequest.wasm.module; the coordinator
resolves sha256 references before offering) and input bytes (TaskRequest.input).

ABI
---
The module may import only these functions, all from the module "env":

- ``input_len() -> i32``: the length of the input in bytes.
- ``input_read(ptr: i32, len: i32) -> i32``: copies min(``len``, bytes not yet read) input
  bytes into guest memory at ``ptr`` and returns how many it copied (0 once all the input has
  been read). Successive calls continue where the last one stopped.
- ``output_write(ptr: i32, len: i32)``: appends ``len`` bytes of guest memory at ``ptr`` to
  the output.

Pointers and lengths are unsigned 32-bit. A range outside the guest memory fails the job
with ``wasm_trap``. The module must export its linear memory as ``memory`` and a function
``run: () -> i32``, which the worker calls once. ``run`` returns a status: 0 is success (the
job's output is what the module wrote); any other value fails the job with ``wasm_exit``,
and the message carries the status and the start of what the module wrote (so a module can
explain itself).

There is no WASI: no filesystem, clock, randomness, environment or network. Threads (shared
memory) are disabled, floating-point NaNs are canonicalized and relaxed SIMD is
deterministic, so the same module and input always produce the same output bytes. The
content type is "application/json" when the output is UTF-8 JSON, otherwise
"application/octet-stream" (as for the built-in echo task).

Limits (WasmExecutor parameters)
--------------------------------
- ``fuel`` (default 2_000_000_000 units, about one per WebAssembly instruction):
  ``wasm_out_of_fuel`` when it runs out.
- ``memory_limit_bytes`` (default 64 MiB) for the linear memory: ``memory.grow`` returns -1
  beyond it; a module that then traps, or that declares more initial memory, fails with
  ``wasm_memory_limit``.
- ``wall_time_seconds`` (default 10 s) for instantiation and ``run`` together, enforced with
  epoch interruption: ``wasm_timeout``. (The job's own time limit still applies on top.)
- ``max_output_bytes`` (default 1 MiB): ``output_too_large``.

Other failure codes: ``wasm_invalid`` (not a WebAssembly binary, does not validate, or lacks
the ``memory`` / ``run`` exports), ``wasm_bad_import`` (imports anything but the functions
above, naming the import), ``wasm_trap`` (any other trap, with its message), ``wasm_exit``
(nonzero status). Every one is a TaskError with retryable=False: the module is at fault, so
the coordinator fails the job at once.

Compilation and execution run in a thread (asyncio.to_thread), so a CPU-bound module never
blocks the worker's event loop. Compiled modules are cached by the SHA-256 of their bytes
(LRU, ``cache_size`` entries), so repeated jobs with the same module skip compilation.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import wasmtime

from dispatch.v1 import common_pb2
from dispatchnet.worker.tasks import TaskError, TaskOutput, _parse_json

if TYPE_CHECKING:
    from dispatchnet.worker.executors import Progress

WASM_TASK = "wasm"
WASM_MAGIC = b"\0asm"
PAGE_BYTES = 65536

DEFAULT_FUEL = 2_000_000_000
DEFAULT_MEMORY_LIMIT_BYTES = 64 * 1024 * 1024
DEFAULT_WALL_TIME_SECONDS = 10.0
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
DEFAULT_CACHE_SIZE = 32
EPOCH_TICK_SECONDS = 0.01

_I32 = "i32"
_HOST_SIGNATURES: dict[str, tuple[list[str], list[str]]] = {
    "input_len": ([], [_I32]),
    "input_read": ([_I32, _I32], [_I32]),
    "output_write": ([_I32, _I32], []),
}
_PROVIDED = ", ".join(f"env.{name}" for name in _HOST_SIGNATURES)


def _signature(params: list[str], results: list[str]) -> str:
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def _describe(err: Exception) -> str:
    """A one-line message from a wasmtime error or trap (which span several lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Caused by:" not in lines:
        return lines[0] if lines else type(err).__name__
    at = lines.index("Caused by:")
    head = lines[0] if at > 0 and "backtrace" not in lines[0] else ""
    causes = [line for line in lines[at + 1 :] if not line[0].isdigit()]
    cause = "; ".join(causes) or head
    return f"{head}: {cause}" if head and cause != head else cause


def _fail(code: str, message: str) -> TaskError:
    return TaskError(code, message, retryable=False)


class _EpochTicker:
    """Increments the engine's epoch every EPOCH_TICK_SECONDS while any module runs.

    The epoch is engine-wide, so each store's wall-time deadline is a number of ticks."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._active = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._thread.start()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_SECONDS)
            with self._lock:
                if self._active == 0:
                    self._thread = None
                    return
            self._engine.increment_epoch()


@dataclass
class _Run:
    """The host side of one execution: its input cursor, output and first host failure."""

    data: bytes
    max_output: int
    read: int = 0
    output: bytearray = field(default_factory=bytearray)
    error: TaskError | None = None
    memory: wasmtime.Memory | None = None


class WasmExecutor:
    """Runs "wasm" TASK jobs in a wasmtime sandbox; see the module docstring for the ABI."""

    def __init__(
        self,
        fuel: int = DEFAULT_FUEL,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        wall_time_seconds: float = DEFAULT_WALL_TIME_SECONDS,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if fuel <= 0 or memory_limit_bytes < PAGE_BYTES or wall_time_seconds <= 0:
            raise ValueError("fuel, memory_limit_bytes and wall_time_seconds must be positive")
        if max_output_bytes < 0 or cache_size < 1:
            raise ValueError("max_output_bytes must be >= 0 and cache_size >= 1")
        self.fuel = fuel
        self.memory_limit_bytes = memory_limit_bytes
        self.wall_time_seconds = wall_time_seconds
        self.max_output_bytes = max_output_bytes
        self.cache_size = cache_size
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.wasm_threads = False
        config.wasm_relaxed_simd_deterministic = True
        config.cranelift_nan_canonicalization = True
        self._engine = wasmtime.Engine(config)
        self._ticker = _EpochTicker(self._engine)
        self._cache: OrderedDict[bytes, wasmtime.Module] = OrderedDict()
        self._cache_lock = threading.Lock()

    # --- Executor protocol ----------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return [WASM_TASK]

    @property
    def llm_models(self) -> list[str]:
        return []

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return (
            spec.WhichOneof("work") == "task"
            and spec.task.name == WASM_TASK
            and not spec.task.use_llm
        )

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        if spec.task.wasm.WhichOneof("source") != "module":
            raise _fail("wasm_invalid", "the offer carries no module bytes")
        return await asyncio.to_thread(self.execute, spec.task.wasm.module, spec.task.input)

    # --- execution (runs in a worker thread) ----------------------------------------------

    def execute(self, module_bytes: bytes, data: bytes) -> TaskOutput:
        """Runs the module's `run` on data; blocking, so call it from a thread."""
        module = self.compile(module_bytes)
        state = _Run(bytes(data), self.max_output_bytes)
        store = wasmtime.Store(self._engine)
        store.set_fuel(self.fuel)
        store.set_epoch_deadline(max(1, math.ceil(self.wall_time_seconds / EPOCH_TICK_SECONDS)))
        store.set_limits(
            memory_size=self.memory_limit_bytes,
            table_elements=65536,
            instances=1,
            tables=4,
            memories=1,
        )
        imports = self._host_functions(store, state)
        with self._ticker:
            try:
                instance = wasmtime.Instance(
                    store, module, [imports[str(imp.name)] for imp in module.imports]
                )
                exports = instance.exports(store)
                memory, run = exports["memory"], exports["run"]
                assert isinstance(memory, wasmtime.Memory) and isinstance(run, wasmtime.Func)
                state.memory = memory
                status = run(store)
            except wasmtime.Trap as e:
                raise self._trap_error(state, store, e) from None
            except wasmtime.WasmtimeError as e:
                # Instantiation failures that are not traps, e.g. too much initial memory.
                if state.error is not None:
                    raise state.error from None
                message = _describe(e)
                code = "wasm_memory_limit" if "memory" in message else "wasm_invalid"
                raise _fail(code, message) from None
        if state.error is not None:
            raise state.error
        output = bytes(state.output)
        if status != 0:
            told = output[:200].decode("utf-8", "replace").strip()
            raise _fail(
                "wasm_exit", f"run returned status {status}" + (f": {told}" if told else "")
            )
        is_json, _ = _parse_json(output)
        return TaskOutput(output, "application/json" if is_json else "application/octet-stream")

    def compile(self, module_bytes: bytes) -> wasmtime.Module:
        """The compiled, ABI-checked module, from the cache when it was seen before."""
        key = hashlib.sha256(module_bytes).digest()
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        if not module_bytes.startswith(WASM_MAGIC):
            raise _fail("wasm_invalid", "not a WebAssembly binary (it does not start with \\0asm)")
        try:
            module = wasmtime.Module(self._engine, module_bytes)
        except wasmtime.WasmtimeError as e:
            raise _fail("wasm_invalid", _describe(e)) from None
        self._check_abi(module)
        with self._cache_lock:
            self._cache[key] = module
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return module

    def _check_abi(self, module: wasmtime.Module) -> None:
        for imp in module.imports:
            name = f"{imp.module}.{imp.name}"
            expected = _HOST_SIGNATURES.get(str(imp.name)) if imp.module == "env" else None
            if expected is None:
                raise _fail(
                    "wasm_bad_import",
                    f"the module imports {name}, which is not provided; "
                    f"only {_PROVIDED} are (no WASI)",
                )
            ty = imp.type
            got = (
                ([str(t) for t in ty.params], [str(t) for t in ty.results])
                if isinstance(ty, wasmtime.FuncType)
                else None
            )
            if got != expected:
                raise _fail(
                    "wasm_bad_import",
                    f"the module imports {name} with the wrong type; "
                    f"it is a function {_signature(*expected)}",
                )
        exports = {e.name: e.type for e in module.exports}
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.MemoryType) or memory.is_64 or memory.is_shared:
            raise _fail("wasm_invalid", 'the module must export a 32-bit memory named "memory"')
        if memory.limits.min * PAGE_BYTES > self.memory_limit_bytes:
            raise _fail(
                "wasm_memory_limit",
                f"the module's memory starts at {memory.limits.min} pages; "
                f"the limit is {self.memory_limit_bytes // PAGE_BYTES}",
            )
        run = exports.get("run")
        if not (
            isinstance(run, wasmtime.FuncType)
            and not run.params
            and [str(t) for t in run.results] == [_I32]
        ):
            raise _fail(
                "wasm_invalid", 'the module must export a function "run" of type () -> (i32)'
            )

    def _trap_error(self, state: _Run, store: wasmtime.Store, trap: wasmtime.Trap) -> TaskError:
        if state.error is not None:  # a host function stopped the module
            return state.error
        code = trap.trap_code
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return _fail("wasm_out_of_fuel", f"the module used all its {self.fuel} units of fuel")
        if code == wasmtime.TrapCode.INTERRUPT:
            return _fail("wasm_timeout", f"the module ran longer than {self.wall_time_seconds:g}s")
        message = _describe(trap)
        if state.memory is not None and (
            state.memory.data_len(store) + PAGE_BYTES > self.memory_limit_bytes
        ):  # it cannot grow by another page: a memory.grow failed
            return _fail(
                "wasm_memory_limit",
                f"{message} (the memory is at its {self.memory_limit_bytes} byte limit)",
            )
        return _fail("wasm_trap", message)

    # --- host functions -------------------------------------------------------------------

    def _host_functions(self, store: wasmtime.Store, state: _Run) -> dict[str, wasmtime.Func]:
        """The "env" imports bound to state.

        A host failure never raises through wasmtime (its Python exception hand-off is a
        process-wide global, unsafe with concurrent jobs): it records the error and takes the
        store's fuel away, so the module stops at its next fuel check."""

        def memory(caller: wasmtime.Caller) -> wasmtime.Memory | None:
            mem = caller.get("memory")
            return mem if isinstance(mem, wasmtime.Memory) else None

        def stop(caller: wasmtime.Caller, code: str, message: str) -> None:
            if state.error is None:
                state.error = _fail(code, message)
            wasmtime.Store.set_fuel(cast(wasmtime.Store, caller), 0)

        def span(caller: wasmtime.Caller, fn: str, ptr: int, length: int) -> wasmtime.Memory | None:
            mem = memory(caller)
            if mem is None:
                stop(caller, "wasm_invalid", 'the module must export a memory named "memory"')
                return None
            if ptr + length > mem.data_len(caller):
                stop(
                    caller,
                    "wasm_trap",
                    f"{fn}: bytes {ptr}..{ptr + length} are outside the module's memory",
                )
                return None
            return mem

        def input_len() -> int:
            return len(state.data)

        def input_read(caller: wasmtime.Caller, ptr: int, length: int) -> int:
            ptr &= 0xFFFFFFFF
            chunk = state.data[state.read : state.read + (length & 0xFFFFFFFF)]
            mem = span(caller, "input_read", ptr, len(chunk))
            if mem is None or not chunk:
                return 0
            mem.write(caller, chunk, ptr)
            state.read += len(chunk)
            return len(chunk)

        def output_write(caller: wasmtime.Caller, ptr: int, length: int) -> None:
            ptr &= 0xFFFFFFFF
            length &= 0xFFFFFFFF
            if state.error is not None:
                return
            if len(state.output) + length > state.max_output:
                stop(
                    caller,
                    "output_too_large",
                    f"the module wrote more than {state.max_output} bytes of output",
                )
                return
            mem = span(caller, "output_write", ptr, length)
            if mem is not None and length:
                state.output += mem.read(caller, ptr, ptr + length)

        i32 = wasmtime.ValType.i32()
        return {
            "input_len": wasmtime.Func(store, wasmtime.FuncType([], [i32]), input_len),
            "input_read": wasmtime.Func(
                store, wasmtime.FuncType([i32, i32], [i32]), input_read, access_caller=True
            ),
            "output_write": wasmtime.Func(
                store, wasmtime.FuncType([i32, i32], []), output_write, access_caller=True
            ),
        }
