"""WebAssembly TASK jobs: the wasmtime sandbox, its limits, and "wasm" jobs end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import grpc
import pytest
import wasmtime
from conftest import Cluster, rpc_code

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import sha256, verify_receipt_message
from dispatchnet.worker.executors import BuiltinTasks, default_executors
from dispatchnet.worker.runtime import Worker
from dispatchnet.worker.tasks import TaskError
from dispatchnet.worker.wasm import WasmExecutor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "wasm"
COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED

IMPORTS = """
  (import "env" "input_len" (func $input_len (result i32)))
  (import "env" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "env" "output_write" (func $output_write (param i32 i32)))
"""


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def example(name: str) -> bytes:
    return wat((EXAMPLES / name).read_text())


def module(body: str, imports: str = IMPORTS, memory: str = "1") -> bytes:
    """A module with the host imports, a memory and `run` with the given body."""
    return wat(
        f'(module {imports} (memory (export "memory") {memory})'
        f' (func (export "run") (result i32) {body}))'
    )


REVERSE = example("reverse.wat")
INFINITE_LOOP = module("(loop $l (br $l)) (i32.const 0)")
UNREACHABLE = module("unreachable")
NOT_WASM = b"#!/bin/sh\necho this is not WebAssembly\n"
# Grows one page at a time until memory.grow fails, then traps.
GROW_UNTIL_LIMIT = module(
    "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable"
)
WASI = wat(
    '(module (import "wasi_snapshot_preview1" "fd_write"'
    " (func (param i32 i32 i32 i32) (result i32)))"
    ' (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))'
)
# Writes 64 KiB of output per iteration, forever.
WRITE_FOREVER = module(
    "(loop $l (call $output_write (i32.const 0) (i32.const 65536)) (br $l)) (i32.const 0)"
)


def run_sync(x: WasmExecutor, mod: bytes, data: bytes = b"") -> tuple[bytes, str]:
    out = x.execute(mod, data)
    return out.output, out.content_type


def failure(x: WasmExecutor, mod: bytes, data: bytes = b"") -> TaskError:
    with pytest.raises(TaskError) as err:
        x.execute(mod, data)
    assert not err.value.retryable
    return err.value


def wasm_spec(mod: bytes, data: bytes) -> common_pb2.JobSpec:
    spec = task_spec("wasm", data)
    spec.task.wasm.module = mod
    return spec


# --- the executor ---------------------------------------------------------------------------


def test_reverse_is_deterministic() -> None:
    x = WasmExecutor()
    data = bytes(range(256)) * 10 + "héllo".encode()
    first = run_sync(x, REVERSE, data)
    assert first == (data[::-1], "application/octet-stream")
    assert run_sync(x, REVERSE, data) == first  # from the module cache
    assert run_sync(WasmExecutor(), REVERSE, data) == first  # a fresh engine
    assert run_sync(x, REVERSE, b"") == (b"", "application/octet-stream")


def test_count_outputs_json() -> None:
    assert run_sync(WasmExecutor(), example("count.wat"), b"hello") == (b"5", "application/json")


def test_input_read_continues_where_it_stopped() -> None:
    # Reads the input 2 bytes at a time and echoes each chunk.
    chunks = module(
        "(local $n i32)"
        " (block $done (loop $l"
        "   (local.set $n (call $input_read (i32.const 0) (i32.const 2)))"
        "   (br_if $done (i32.eqz (local.get $n)))"
        "   (call $output_write (i32.const 0) (local.get $n))"
        "   (br $l)))"
        " (i32.const 0)"
    )
    assert run_sync(WasmExecutor(), chunks, b"hello")[0] == b"hello"


def test_infinite_loop_runs_out_of_fuel() -> None:
    start = time.monotonic()
    err = failure(WasmExecutor(fuel=10_000_000), INFINITE_LOOP)
    assert err.code == "wasm_out_of_fuel"
    assert time.monotonic() - start < 5


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    err = failure(WasmExecutor(fuel=10**18, wall_time_seconds=0.3), INFINITE_LOOP)
    assert err.code == "wasm_timeout"
    assert 0.25 < time.monotonic() - start < 5


def test_memory_growth_hits_the_limit() -> None:
    x = WasmExecutor(memory_limit_bytes=1024 * 1024)
    err = failure(x, GROW_UNTIL_LIMIT)
    assert err.code == "wasm_memory_limit"
    assert "1048576" in err.message
    # A module that starts with more memory than the limit.
    assert failure(x, module("(i32.const 0)", memory="17")).code == "wasm_memory_limit"


def test_unknown_import_is_refused_by_name() -> None:
    err = failure(WasmExecutor(), WASI)
    assert err.code == "wasm_bad_import"
    assert "wasi_snapshot_preview1.fd_write" in err.message


def test_host_import_with_the_wrong_type_is_refused() -> None:
    bad = module("(i32.const 0)", imports='(import "env" "input_len" (func (result i64)))')
    err = failure(WasmExecutor(), bad)
    assert err.code == "wasm_bad_import"
    assert "env.input_len" in err.message


@pytest.mark.parametrize(
    "mod",
    [
        NOT_WASM,
        b"",
        b"(module)",  # WAT text is not accepted in place of the binary
        b"\0asm\x01\0\0\0\xff",  # right magic, does not validate
        wat('(module (func (export "run") (result i32) (i32.const 0)))'),  # no memory
        wat('(module (memory (export "memory") 1) (func (export "run")))'),  # run has no result
        wat('(module (memory (export "memory") 1))'),  # no run
    ],
)
def test_invalid_modules(mod: bytes) -> None:
    assert failure(WasmExecutor(), mod).code == "wasm_invalid"


def test_unreachable_is_a_trap() -> None:
    err = failure(WasmExecutor(), UNREACHABLE)
    assert err.code == "wasm_trap"
    assert "unreachable" in err.message
    assert "\n" not in err.message


def test_out_of_bounds_host_access_is_a_trap() -> None:
    oob = module("(call $output_write (i32.const 65530) (i32.const 100)) (i32.const 0)")
    err = failure(WasmExecutor(), oob)
    assert err.code == "wasm_trap" and "output_write" in err.message
    negative = module("(drop (call $input_read (i32.const -1) (i32.const 4))) (i32.const 0)")
    assert failure(WasmExecutor(), negative, b"data").code == "wasm_trap"


def test_output_is_capped() -> None:
    # Unlimited fuel and time: the host stops the module at once when it writes too much.
    x = WasmExecutor(fuel=10**18, wall_time_seconds=30, max_output_bytes=100_000)
    start = time.monotonic()
    err = failure(x, WRITE_FOREVER)
    assert err.code == "output_too_large"
    assert time.monotonic() - start < 5


def test_nonzero_status_fails_with_the_modules_words() -> None:
    says = wat(
        f'(module {IMPORTS} (memory (export "memory") 1) (data (i32.const 0) "bad input")'
        ' (func (export "run") (result i32)'
        " (call $output_write (i32.const 0) (i32.const 9)) (i32.const 3)))"
    )
    err = failure(WasmExecutor(), says)
    assert err.code == "wasm_exit"
    assert err.message == "run returned status 3: bad input"


def test_compiled_modules_are_cached_by_hash() -> None:
    x = WasmExecutor(cache_size=2)
    a = x.compile(REVERSE)
    assert x.compile(bytes(REVERSE)) is a
    x.compile(UNREACHABLE)
    x.compile(INFINITE_LOOP)  # evicts REVERSE, the least recently used
    assert x.compile(REVERSE) is not a


async def test_concurrent_runs_keep_their_own_failures() -> None:
    x = WasmExecutor(fuel=50_000_000, max_output_bytes=100_000)
    mods = [WRITE_FOREVER, UNREACHABLE, INFINITE_LOOP, REVERSE] * 3

    async def code(mod: bytes) -> str:
        try:
            out = await x.run(wasm_spec(mod, b"abc"), lambda text, fraction: None)
        except TaskError as e:
            return e.code
        return out.output.decode()

    got = await asyncio.gather(*(code(m) for m in mods))
    assert got == ["output_too_large", "wasm_trap", "wasm_out_of_fuel", "cba"] * 3


async def test_running_wasm_does_not_block_the_event_loop() -> None:
    x = WasmExecutor(fuel=10**18, wall_time_seconds=1.0)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(TaskError) as err:
            await x.run(wasm_spec(INFINITE_LOOP, b""), lambda text, fraction: None)
    finally:
        ticker.cancel()
    assert err.value.code == "wasm_timeout"
    assert ticks > 20


def test_takes_only_wasm_task_specs() -> None:
    x = WasmExecutor()
    assert x.tasks == ["wasm"] and x.llm_models == []
    assert x.takes(wasm_spec(REVERSE, b""))
    assert not x.takes(task_spec("echo", b"1"))
    llm = wasm_spec(REVERSE, b"")
    llm.task.use_llm = True
    assert not x.takes(llm)
    assert not x.takes(common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="hi")))


async def test_an_offer_without_module_bytes_fails() -> None:
    spec = task_spec("wasm", b"")
    spec.task.wasm.sha256 = sha256(REVERSE)
    with pytest.raises(TaskError) as err:
        await WasmExecutor().run(spec, lambda text, fraction: None)
    assert err.value.code == "wasm_invalid"


def test_workers_run_wasm_by_default() -> None:
    assert [type(e) for e in default_executors()] == [BuiltinTasks, WasmExecutor]
    for kind in ("seeker", "desktop"):
        w = Worker("127.0.0.1:1", KeyPair.generate(), kind=kind)  # type: ignore[arg-type]
        assert "wasm" in w.tasks and "echo" in w.tasks


# --- end to end -----------------------------------------------------------------------------


async def test_wasm_job_completes_with_a_valid_receipt(cluster: Cluster) -> None:
    w = await cluster.worker()
    c = cluster.client()
    quote = await c.quote(wasm_spec(REVERSE, b"hello"))
    assert quote.eligible_workers == 1
    done = await c.wait((await c.commit(quote.quote_id)).job_id)
    assert done.state == COMPLETED, done.failure
    assert done.result.output == b"olleh"
    assert done.result.content_type == "application/octet-stream"
    assert done.worker_id == w.key.public_hex
    v = verify_receipt_message(done.receipt, cluster.coord.public_key)
    assert v.valid, v.problems
    assert v.body is not None
    assert v.body.input_sha256 == quote.spec_sha256
    assert v.body.output_sha256 == sha256(b"olleh")
    assert v.body.job_type == common_pb2.JOB_TYPE_TASK

    # The same module by reference: the quote resolves it to the same spec.
    by_hash = task_spec("wasm", b"hello")
    by_hash.task.wasm.sha256 = hashlib.sha256(REVERSE).digest()
    again = await c.quote(by_hash)
    assert again.spec_sha256 == quote.spec_sha256
    assert again.spec.task.wasm.module == REVERSE
    second = await c.wait((await c.commit(again.quote_id)).job_id)
    assert second.state == COMPLETED and second.result.output == b"olleh"
    other = task_spec("wasm", b"abc")
    other.task.wasm.sha256 = hashlib.sha256(REVERSE).digest()
    third = await c.wait((await c.submit(other)).job_id)
    assert third.result.output == b"cba"


async def test_unknown_module_hash_is_not_found(cluster: Cluster) -> None:
    spec = task_spec("wasm", b"hello")
    spec.task.wasm.sha256 = hashlib.sha256(b"never sent").digest()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.client().quote(spec)
    assert rpc_code(e.value) == grpc.StatusCode.NOT_FOUND


async def test_hostile_module_fails_and_the_worker_keeps_serving(cluster: Cluster) -> None:
    w = await cluster.worker(
        executors=[BuiltinTasks(), WasmExecutor(fuel=20_000_000, wall_time_seconds=5)]
    )
    c = cluster.client()
    bad = await c.wait((await c.submit(wasm_spec(INFINITE_LOOP, b"x"))).job_id)
    assert bad.state == FAILED
    assert bad.failure.code == "wasm_out_of_fuel"
    assert bad.attempts == 1
    good = await c.wait((await c.submit(wasm_spec(REVERSE, b"still here"))).job_id)
    assert good.state == COMPLETED and good.result.output == b"ereh llits"
    assert good.worker_id == bad.worker_id == w.key.public_hex
    assert w.failed == 1 and w.completed == 1


async def test_a_module_that_is_not_wasm_fails_at_once(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    done = await c.wait((await c.submit(wasm_spec(NOT_WASM, b"x"))).job_id)
    assert done.state == FAILED
    assert done.failure.code == "wasm_invalid"
    assert done.attempts == 1


async def test_cli_submits_a_wat_file(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.worker()
    env = {k: v for k, v in os.environ.items() if k != "DISPATCH_COORDINATOR"}
    env["DISPATCH_HOME"] = str(tmp_path / "home")
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatchnet.cli",
        "job",
        "submit",
        "--coordinator",
        cluster.address,
        "--wasm",
        str(EXAMPLES / "reverse.wat"),
        "--input",
        "hello",
        "--wait",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()
    job = json.loads(out)
    assert job["state"] == "JOB_STATE_COMPLETED"
    assert job["output_decoded"] == "olleh"
    assert job["spec"]["task"]["name"] == "wasm"
