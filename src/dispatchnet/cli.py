"""The `dispatch` command."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2
from dispatchnet import eventloop, keys
from dispatchnet.auth.tokens import METADATA_KEY, metadata_value
from dispatchnet.client import PAYMENT_REQUIRED, CoordinatorClient, llm_spec, task_spec, trailer
from dispatchnet.memory import HeapFreezer, young_collections_every
from dispatchnet.observability import logs, tracing
from dispatchnet.profiles import AuthConfig, Profile, ProfileError, load_profile
from dispatchnet.protocol import MAX_CONCURRENCY, MAX_EARNINGS_PAGE
from dispatchnet.protocol import MAX_PAIRING_TTL_SECONDS as MAX_PAIRING_TTL
from dispatchnet.receipts.core import check_receipt_proof, verify_receipt_message
from dispatchnet.sealing import SealError

DEFAULT_COORDINATOR = "127.0.0.1:50051"
DEFAULT_MCP_LISTEN = "127.0.0.1:8765"
POLICIES = {
    "auto": common_pb2.POLICY_AUTO,
    "fast": common_pb2.POLICY_FAST,
    "cheap": common_pb2.POLICY_CHEAP,
}
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1  # protobuf's uint32 and uint64 fields
# the token lifetime coordinators accept unless their profile's [auth] says otherwise
MAX_TOKEN_TTL = AuthConfig.max_token_ttl_seconds


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1 (or .code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def job_json(job: coordinator_pb2.Job, client: CoordinatorClient | None = None) -> dict[str, Any]:
    """The job as JSON, plus its output decoded for people when it is text. A completed
    job with sealed input is opened with `client`'s key and checked against its receipt
    first: "private" then holds the plaintext output (CliError when it does not check)."""
    out = to_dict(job)
    output = job.result.output
    if client is not None and job.spec.HasField("sealed") and job.HasField("result"):
        try:
            opened = client.open_result(job)
        except SealError as e:
            raise CliError(f"job {job.job_id}: the sealed result is refused: {e}") from e
        output = opened.output
        out["private"] = {
            "output": base64.b64encode(opened.output).decode(),
            "content_type": opened.content_type,
            "verified": "receipt signatures, ciphertext and plaintext hashes",
        }
    if job.HasField("result"):
        try:
            text = output.decode()
        except UnicodeDecodeError:
            return out
        try:
            out["output_decoded"] = json.loads(text)
        except ValueError:
            out["output_decoded"] = text
    return out


def _client_key(args: argparse.Namespace) -> keys.KeyPair:
    return keys.load_or_create(Path(args.key_file or keys.default_home() / "client.key"))


def _worker_key(args: argparse.Namespace) -> keys.KeyPair:
    return keys.load_or_create(_worker_key_path(args))


def _worker_key_path(args: argparse.Namespace) -> Path:
    return Path(args.key_file or keys.default_home() / "worker.key")


def _existing_key(args: argparse.Namespace, who: str) -> keys.KeyPair:
    """The `who` ("client" or "worker") key of --key-file (default: <who>.key in
    $DISPATCH_HOME), which must exist: for commands acting as an identity made before,
    where a new key would own nothing (a --key-file typo). CliError (exit 2) when missing."""
    path = Path(args.key_file or keys.default_home() / f"{who}.key").expanduser()
    if not path.exists():
        raise CliError(f"no {who} key file at {path} (pass the {who}'s --key-file)", code=2)
    return keys.load(path)


def _agent_file(key_path: Path) -> Path:
    """Where `dispatch worker register` records the agent: next to the worker key
    (worker.key -> worker.agent.json)."""
    return key_path.with_suffix(".agent.json")


def _default_chain_key(key_path: Path) -> Path:
    """The worker's secp256k1 chain key, next to its ed25519 key (worker.chain.key)."""
    return key_path.with_suffix(".chain.key")


def _default_solana_key(key_path: Path) -> Path:
    """The worker's Solana keypair, next to its ed25519 key (worker.solana.key)."""
    return key_path.with_suffix(".solana.key")


def _worker_agent(args: argparse.Namespace) -> tuple[str, str, keys.KeyPair | None]:
    """(agent id, chain key, Solana key or None) recorded by `dispatch worker register` in
    --agent-file (default next to the worker key), or ("", "", None) when there is none."""
    explicit = getattr(args, "agent_file", None)
    path = Path(explicit) if explicit else _agent_file(_worker_key_path(args))
    if not path.exists():
        if explicit:
            raise CliError(f"no agent file {path}")
        return "", "", None
    try:
        data = json.loads(path.read_text())
        agent_id, chain_key_file = str(data["agent_id"]), Path(data["chain_key_file"])
        solana_key_file = Path(data["solana_key_file"]) if data.get("solana_key_file") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"{path} is not an agent file from `dispatch worker register`: {e}") from e
    import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
    from dispatchnet.chains.deployments import ChainConfigError
    from dispatchnet.chains.evm.node import load_or_create_chain_key

    for needed in (chain_key_file, solana_key_file):
        if needed is not None and not needed.exists():
            raise CliError(f"{path}: its key file {needed} is missing")
    try:
        solana = None
        if solana_key_file is not None:
            from dispatchnet.chains.solana.wallet import load_or_create_solana_key

            # a Solana keypair is an ed25519 seed || public key
            solana = keys.KeyPair.from_seed(bytes(load_or_create_solana_key(solana_key_file))[:32])
        return agent_id, load_or_create_chain_key(chain_key_file), solana
    except ChainConfigError as e:
        raise CliError(str(e)) from e


# --- coordinator / worker -----------------------------------------------------------------


def _profile_with_store(args: argparse.Namespace) -> Profile:
    """The --profile, its [store] url replaced by --store when given."""
    profile = load_profile(args.profile)
    if args.store:
        profile = profile.with_overrides(store={"url": args.store})
    return profile


async def cmd_coordinator(args: argparse.Namespace) -> int:
    from dispatchnet.errors import Unavailable
    from dispatchnet.server import start_coordinator
    from dispatchnet.store import registry as stores

    profile = _profile_with_store(args)
    tools = {
        k: v
        for k, v in (
            ("metrics_listen", args.metrics_listen),
            ("dashboard_listen", args.dashboard_listen),
        )
        if v is not None
    }
    if tools:
        profile = profile.with_overrides(observability=tools)
    listen = args.listen or profile.server.listen
    _host_port(listen)  # HOST:PORT, else a usage error before anything is opened
    data_dir = Path(args.data_dir or keys.default_home() / f"coordinator-{profile.name}")
    try:
        coord = await start_coordinator(profile, data_dir, listen)
    except Unavailable as e:
        raise CliError(e.message) from e
    # What exists now (modules, stubs, the profile, the SDKs' tables) lives as long as the
    # process, and so do connected workers' sessions: frozen out of the cyclic collector
    # (now, and after each wave of connections), a full collection scans only what jobs
    # made since, instead of pausing the event loop over the whole heap (measured: 70 ms
    # at start, 100-270 ms with 5,000 seekers connected; README "Benchmark").
    young_collections_every()
    heap = HeapFreezer()
    heap.start()
    coord.hub.session_listeners.append(heap.sessions_changed)
    dashboard = coord.observability.dashboard if coord.observability else None
    print(
        json.dumps(
            {
                "listening": f"{listen.rsplit(':', 1)[0]}:{coord.port}",
                "profile": profile.name,
                "data_dir": str(data_dir),
                "store": stores.describe(profile, data_dir),
                "coordinator_public_key": coord.public_key.hex(),
                "anchoring": coord.anchoring,
                "metrics": coord.metrics_url,
                "dashboard": coord.dashboard_url,
                # the operator token: never printed, read from this file
                "dashboard_token_file": str(dashboard.token_file) if dashboard else "",
            }
        ),
        flush=True,
    )
    await _until_signal()
    await heap.close()
    await coord.stop(grace=2.0)
    return 0


async def cmd_gateway(args: argparse.Namespace) -> int:
    from dispatchnet.gateways.http import Gateway
    from dispatchnet.gateways.serve import GatewayServer, gateway_router, parse_listen

    profile = load_profile(args.profile)
    host, port = parse_listen(args.listen)
    try:
        coordinator_key = bytes.fromhex(args.coordinator_key or "")
    except ValueError:
        raise CliError("--coordinator-key must be hex", code=2) from None
    coordinators = [a.strip() for a in (args.coordinator or "").split(",") if a.strip()]
    router = gateway_router(
        profile,
        coordinators,
        key_file=args.key_file,
        max_price_micros=args.max_price_micros or None,
        hosted=args.hosted_budget_micros > 0,
        coordinator_key=coordinator_key,
    )
    gateway = Gateway(
        router,
        max_body_bytes=args.max_body_bytes,
        max_concurrent=args.max_concurrent,
        hosted_budget_micros=args.hosted_budget_micros,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn takes both while it serves and raises the one it got again once it has
        # stopped: that one must not kill the process before the router is closed
        loop.add_signal_handler(sig, lambda: None)
    async with contextlib.AsyncExitStack() as stack:
        try:  # entering binds the socket
            server = await stack.enter_async_context(
                GatewayServer(gateway, host, port, "debug" if args.verbose else "info")
            )
        except OSError as e:
            raise CliError(f"cannot listen on {args.listen}: {e.strerror or e}") from e
        net = router.networks[0]
        print(
            json.dumps(
                {
                    "listening": server.url,
                    "profile": profile.name,
                    "network": net.name,
                    "coordinators": list(net.coordinators),
                    "client_id": router.client_id,
                    "max_price_micros": args.max_price_micros or None,
                    "hosted": [p.route for p in router.hosted],
                    "hosted_budget_micros": args.hosted_budget_micros,
                }
            ),
            flush=True,
        )
        await server.wait()
    return 0


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def cmd_worker(args: argparse.Namespace) -> int:
    from dispatchnet.worker.executors import default_executors
    from dispatchnet.worker.llm import LlmSetupError, llm_executor
    from dispatchnet.worker.lying import lying, warning
    from dispatchnet.worker.runtime import Worker

    if getattr(args, "worker_cmd", None) == "register":
        return await cmd_worker_register(args)
    if getattr(args, "worker_cmd", None) == "earnings":
        return await cmd_worker_earnings(args)
    agent_id, chain_key, solana_key = _worker_agent(args)
    executors = default_executors()
    try:
        llm = llm_executor(args.kind, args.llm_backend, args.llm_url, args.model, args.model_path)
    except LlmSetupError as e:
        raise CliError(str(e)) from e
    if llm is not None:
        executors.append(llm)
    if args.lie_rate:
        logging.getLogger("dispatch.worker").warning(warning(args.lie_rate, "this worker"))
        executors = lying(executors, args.lie_rate)
    worker = Worker(
        args.coordinator,
        _worker_key(args),
        kind=args.kind,
        max_concurrency=args.max_concurrency,
        executors=executors,
        agent_id=agent_id,
        chain_key=chain_key,
        solana_key=solana_key,
    )
    loop = asyncio.get_running_loop()
    draining: set[asyncio.Task[None]] = set()

    def on_term() -> None:
        if not draining:
            logging.getLogger("dispatch.worker").info("SIGTERM: draining")
            draining.add(asyncio.create_task(worker.drain(args.drain_timeout)))
        else:
            worker.stop()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    print(
        json.dumps(
            {
                "worker_id": worker.key.public_hex,
                "kind": args.kind,
                "coordinator": args.coordinator,
                "llm_models": worker.llm_models,
                "agent_id": agent_id,
                **({"lie_rate": args.lie_rate} if args.lie_rate else {}),
            }
        ),
        flush=True,
    )
    await worker.run()
    return 0


async def cmd_worker_register(args: argparse.Namespace) -> int:
    """Registers the worker in the profile's IdentityRegistry (see README "Worker identity"):
    [chain]'s, or [identity_chain]'s with the worker's Solana key (a keypair file of the
    profile's chain kind, --solana-key-file) named in its metadata and registration file."""
    import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError
    from dispatchnet.chains.evm.identity import fund_dev_account, register_worker
    from dispatchnet.chains.evm.node import TRANSIENT, load_or_create_chain_key, resolve_evm_chain

    profile = load_profile(args.profile)
    linked = registry.identity_profile(profile)  # identities on another chain
    evm = linked or profile
    key_path = _worker_key_path(args)
    key = keys.load_or_create(key_path)
    chain_key_path = (
        Path(args.chain_key_file) if args.chain_key_file else _default_chain_key(key_path)
    )
    solana_key_path: Path | None = None
    solana = ""
    try:
        if linked is not None:
            solana_key_path = (
                Path(args.solana_key_file)
                if args.solana_key_file
                else _default_solana_key(key_path)
            )
            solana = registry.adapter_of(profile).new_wallet_key(solana_key_path)
        chain = resolve_evm_chain(evm.chain)
        chain_key = load_or_create_chain_key(chain_key_path)
        address = str(_chain_address(chain_key))
        funded = False
        if evm.chain.devchain:
            # a local dev chain: give the new account gas money (anvil_setBalance)
            funded = await asyncio.to_thread(fund_dev_account, chain, address, 10**18)
        result = await asyncio.to_thread(
            register_worker,
            chain,
            chain_key,
            key.public_key,
            name=args.name or f"dispatch-worker-{key.public_hex[:8]}",
            description=args.description,
            endpoint=args.endpoint or args.coordinator,
            timeout=evm.chain.tx_timeout_seconds,
            solana=solana,
        )
    except ChainConfigError as e:
        raise CliError(str(e)) from e
    except TRANSIENT as e:
        raise CliError(f"cannot reach chain {evm.chain.network}: {e}") from e
    except RuntimeError as e:  # a reverted transaction
        raise CliError(f"registration failed: {e}") from e
    agent_file = _agent_file(key_path)
    agent_file.write_text(
        json.dumps(
            {
                "agent_id": result["agent_id"],
                "chain_key_file": str(chain_key_path.resolve()),
                "chain_address": result["chain_address"],
                "network": result["network"],
                "identity_registry": result["identity_registry"],
                "solana": result["solana"],
                **(
                    {"solana_key_file": str(solana_key_path.resolve())}
                    if solana_key_path is not None
                    else {}
                ),
            },
            indent=2,
        )
        + "\n"
    )
    emit(
        {
            **result,
            "worker_id": key.public_hex,
            "chain_key_file": str(chain_key_path),
            **({"solana_key_file": str(solana_key_path)} if solana_key_path else {}),
            "agent_file": str(agent_file),
            "funded": funded,
        }
    )
    return 0


def _chain_address(chain_key: str) -> str:
    from eth_account import Account

    return str(Account.from_key(chain_key).address)


async def cmd_seekers(args: argparse.Namespace) -> int:
    from dispatchnet.worker.lying import warning
    from dispatchnet.worker.seekers import WORKER_LOG, SeekerSwarm

    try:
        swarm = SeekerSwarm(
            args.coordinator,
            args.count,
            seed=args.seed,
            max_concurrency=args.max_concurrency,
            flaky=args.flaky,
            battery=args.battery,
            heat=args.heat,
            slow=args.slow,
            key_dir=Path(args.key_dir) if args.key_dir else None,
            lie_rate=args.lie_rate,
        )
    except ValueError as e:
        raise CliError(str(e), code=2) from e
    if args.lie_rate:
        logging.getLogger("dispatch.seekers").warning(warning(args.lie_rate, "these seekers"))
    if not args.verbose:
        logging.getLogger(WORKER_LOG).setLevel(logging.WARNING)
    draining = asyncio.Event()

    def on_signal() -> None:
        if not draining.is_set():
            logging.getLogger("dispatch.seekers").info("draining %d seekers", args.count)
            draining.set()
        else:
            swarm.stop()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    info = {"seekers": args.count, "coordinator": args.coordinator, "seed": swarm.seed}
    print(json.dumps(info), flush=True)
    await swarm.start()
    await draining.wait()
    await swarm.drain(args.drain_timeout)
    return 0


# --- jobs ---------------------------------------------------------------------------------


def _task_input(text: str | None) -> bytes:
    if text is None:
        return b"null"
    try:
        json.loads(text)
    except ValueError as e:
        raise CliError(f"--input must be JSON (got {text!r}: {e})", code=2) from e
    return text.encode()


def _wasm_file(path: str) -> bytes:
    """The binary module for --wasm: a .wasm file, or .wat text compiled here."""
    import wasmtime  # only `job submit --wasm` needs it

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"--wasm: cannot read {path}: {e.strerror or e}", code=2) from e
    if path.endswith(".wat"):
        try:
            data = bytes(wasmtime.wat2wasm(data))
        except wasmtime.WasmtimeError as e:
            detail = str(e).replace("<anon>", path)
            raise CliError(f"--wasm: {path} is not valid WAT: {detail}", code=2) from e
    elif not data.startswith(b"\0asm"):
        raise CliError(
            f"--wasm: {path} is not a WebAssembly binary (name WAT text files *.wat)", code=2
        )
    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as e:
        raise CliError(f"--wasm: {path} is not a valid WebAssembly module: {e}", code=2) from e
    return data


def _submit_spec(args: argparse.Namespace) -> common_pb2.JobSpec:
    """The spec for `job submit`, from whichever of its work options (--task, --wasm,
    --prompt) is set, with --verify's runs."""
    spec = _work_spec(args)
    spec.verify = args.verify or 0
    return spec


def _work_spec(args: argparse.Namespace) -> common_pb2.JobSpec:
    llm_options = (args.model, args.max_tokens, args.temperature)
    if args.prompt is not None:
        if args.input is not None or args.use_llm:
            raise CliError("--input and --use-llm go with --task, not --prompt", code=2)
        return llm_spec(
            args.prompt,
            args.model or "",
            args.max_tokens or 0,
            args.temperature or 0.0,
            POLICIES[args.policy],
            args.private,
        )
    if any(o is not None for o in llm_options):
        raise CliError("--model, --max-tokens and --temperature go with --prompt", code=2)
    if args.use_llm and args.task is None:
        raise CliError("--use-llm goes with --task (summarize, classify, extract_json)", code=2)
    if args.wasm is not None:
        # --input is raw text here: its UTF-8 bytes are the module's input.
        data = (args.input or "").encode()
        spec = task_spec("wasm", data, POLICIES[args.policy], args.private)
        spec.task.wasm.module = _wasm_file(args.wasm)
        return spec
    spec = task_spec(args.task, _task_input(args.input), POLICIES[args.policy], args.private)
    spec.task.use_llm = args.use_llm
    return spec


def _wallet(args: argparse.Namespace) -> Any:
    """The wallet `job submit` pays with: --wallet-key, else the profile's [wallet] (its
    key_file, or the chain deployment's "client" dev account); None with --no-pay."""
    if args.no_pay:
        return None
    profile = load_profile(args.profile)
    if args.max_payment is not None:
        profile = profile.with_overrides(wallet={"max_per_job_micros": args.max_payment})
    from dispatchnet.chains import registry

    return registry.adapter_of(profile).client_wallet(profile, args.wallet_key or "")


async def cmd_job_submit(args: argparse.Namespace) -> int:
    spec = _submit_spec(args)
    async with CoordinatorClient(args.coordinator, _client_key(args), _wallet(args)) as c:
        if args.private:
            try:  # encrypted end to end, to every worker the client is paired with
                spec = await c.seal(spec)
            except SealError as e:
                raise CliError(str(e)) from e
        if args.wait:  # one RunJob call (a paying client asks GetQuote first)
            job = await _run_job(c, spec, args.idempotency_key or "")
        else:
            quote = await c.quote(spec)
            job = await c.commit(quote.quote_id, args.idempotency_key or "")
        out = job_json(job, c)
    emit(out)
    if args.wait and job.state != coordinator_pb2.JOB_STATE_COMPLETED:
        return 1
    return 0


async def _run_job(c: CoordinatorClient, spec: common_pb2.JobSpec, key: str) -> coordinator_pb2.Job:
    """c.run(spec). A paid coordinator refuses RunJob from a client without a wallet with
    no payment-required trailer (a payment is for a quote): CliError then says what it
    accepts and how to pay, from a GetQuote's trailer, as a refused CommitJob does."""
    try:
        return await c.run(spec, key)
    except grpc.aio.AioRpcError as e:
        if (
            c.wallet is not None
            or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
            or trailer(e.trailing_metadata(), PAYMENT_REQUIRED)
        ):
            raise
        try:
            call = c.jobs.GetQuote(
                coordinator_pb2.GetQuoteRequest(spec=spec), metadata=c.metadata()
            )
            await call
            required = trailer(await call.trailing_metadata(), PAYMENT_REQUIRED)
        except grpc.aio.AioRpcError:
            required = ""
        if not required:  # refused for another reason (too many open jobs...)
            raise
        details = f"{e.code().name}: {e.details()}"
        raise CliError(f"{details}\n{describe_payment_required(required)}") from e


async def cmd_job_get(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.coordinator, _existing_key(args, "client")) as c:
        emit(job_json(await c.get(args.job_id), c))
    return 0


async def cmd_job_watch(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.coordinator, _existing_key(args, "client")) as c:
        async for item in c.watch(args.job_id, args.after):
            print(json.dumps(to_dict(item.event)), flush=True)
            if item.HasField("job"):
                return 0 if item.job.state == coordinator_pb2.JOB_STATE_COMPLETED else 1
    return 0


async def cmd_job_cancel(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.coordinator, _existing_key(args, "client")) as c:
        emit(job_json(await c.cancel(args.job_id, args.reason or "")))
    return 0


async def cmd_workers(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.coordinator, keys.KeyPair.generate()) as c:
        emit([to_dict(w) for w in await c.list_workers()])
    return 0


async def cmd_worker_earnings(args: argparse.Namespace) -> int:
    """The worker's balance, its share per job and its payouts (GetEarnings, signed with
    the worker key), as JSON; --all follows every page of jobs; --profile adds its payout
    addresses read on that profile's chains ("on_chain")."""
    key = _existing_key(args, "worker")  # a new key would have earned nothing
    profile = load_profile(args.profile) if args.profile else None
    async with CoordinatorClient(args.coordinator, key) as c:
        resp = await c.earnings(args.page_size, args.page_token or "")
        payouts = list(resp.payouts)
        out = json_format.MessageToDict(
            resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        while args.all and resp.next_page_token:
            resp = await c.earnings(args.page_size, resp.next_page_token)
            out["jobs"] += [
                json_format.MessageToDict(j, preserving_proto_field_name=True) for j in resp.jobs
            ]
            out["next_page_token"] = resp.next_page_token
    if profile is not None:
        out["on_chain"] = await _payouts_on_chain(profile, payouts)
    emit(out)
    return 0


async def _payouts_on_chain(
    profile: Profile, payouts: list[coordinator_pb2.Payout]
) -> dict[str, Any]:
    """Per network, asset and payout address of the worker's payouts: the landed total and
    the address's balance read on chain, through the adapter of the profile's chain on
    that network (payments/earnings_check.py)."""
    from dispatchnet.chains import registry
    from dispatchnet.errors import Unavailable
    from dispatchnet.payments.earnings_check import PaidTo, addresses_on_chain
    from dispatchnet.protocol import MAX_EARNINGS_PAGE

    def read(network: str, asset: str, address: str) -> int | None:
        on = registry.payment_profile(profile, network)
        if on is None:
            return None
        return registry.adapter_of(on).token_balance(on, asset, address)

    paid = [PaidTo(p.network, p.asset, p.to, int(p.amount), p.state) for p in payouts]
    try:
        rows = await asyncio.to_thread(addresses_on_chain, paid, read)
    except Unavailable as e:
        raise CliError(e.message) from e
    except ValueError as e:  # ChainConfigError, or an address that is not one
        raise CliError(str(e)) from e
    notes = [
        f"no chain of profile {profile.name} is on {n}: its balances are not read"
        for n in dict.fromkeys(r["network"] for r in rows if r["balance"] is None)
    ]
    if len(payouts) >= MAX_EARNINGS_PAGE:
        notes.append(f"only the newest {MAX_EARNINGS_PAGE} payouts are counted")
    unaddressed = sum(1 for p in payouts if not p.to)
    if unaddressed:
        notes.append(f"{unaddressed} payout(s) name no address and are not counted")
    return {"profile": profile.name, "addresses": rows, "notes": notes}


# --- pairing ------------------------------------------------------------------------------


async def cmd_pair(args: argparse.Namespace) -> int:
    if args.pair_cmd == "claim":  # the key of a worker that runs: never a new one
        key = _existing_key(args, "worker")
    elif args.pair_cmd == "create":  # a client may pair before its first job
        key = _client_key(args)
    else:  # pairings of a client that exists
        key = _existing_key(args, "client")
    async with CoordinatorClient(args.coordinator, key) as c:
        if args.pair_cmd == "create":
            emit(to_dict(await c.create_pairing_code(args.ttl)))
        elif args.pair_cmd == "claim":
            emit(to_dict(await c.claim_pairing(args.code)))
        elif args.pair_cmd == "list":
            emit([to_dict(p) for p in await c.list_pairings(args.all)])
        else:
            emit(to_dict(await c.revoke_pairing(args.pairing_id)))
    return 0


# --- receipts and auth --------------------------------------------------------------------


def load_receipt_file(path: Path) -> receipt_pb2.Receipt:
    """Reads a receipt from a `job submit --wait` / `job get` JSON file, a gateway answer
    (its `dispatch` field), a bare Receipt as JSON, or the gateway's X-Dispatch-Receipt
    value (base64 of the Receipt message)."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}", code=2) from e
    try:
        data = json.loads(text)
    except ValueError as e:
        receipt = _receipt_b64(text)
        if receipt is None:
            raise CliError(f"cannot read {path}: {e}", code=2) from e
        return receipt
    for wrapper in ("job", "dispatch"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if isinstance(data, dict) and "receipt" in data:
        data = data["receipt"]
    receipt = receipt_pb2.Receipt()
    try:
        json_format.ParseDict(data, receipt, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise CliError(f"{path} holds no receipt: {e}", code=2) from e
    if not receipt.body:
        raise CliError(f"{path} holds no receipt (no body)", code=2)
    return receipt


def _receipt_b64(text: str) -> receipt_pb2.Receipt | None:
    """A Receipt from base64 of its bytes (X-Dispatch-Receipt); None when it is not one."""
    try:
        receipt = receipt_pb2.Receipt.FromString(base64.b64decode(text.strip(), validate=True))
    except (ValueError, DecodeError):
        return None
    return receipt if receipt.body else None


def load_proof_file(path: Path) -> receipt_pb2.GetReceiptProofResponse:
    """Reads a proof saved from `receipt proof` (GetReceiptProofResponse as proto JSON)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}", code=2) from e
    proof = receipt_pb2.GetReceiptProofResponse()
    try:
        json_format.ParseDict(data, proof, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise CliError(f"{path} holds no receipt proof: {e}", code=2) from e
    if not proof.merkle_root:
        raise CliError(f"{path} holds no receipt proof (no merkle_root)", code=2)
    return proof


def proof_json(proof: receipt_pb2.GetReceiptProofResponse) -> dict[str, Any]:
    """Proto JSON of a proof, zero values included (leaf_index 0, empty anchor), in the
    order of the message's fields."""
    d = json_format.MessageToDict(
        proof, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {f.name: d[f.name] for f in proof.DESCRIPTOR.fields if f.name in d}


async def cmd_receipt_verify(args: argparse.Namespace) -> int:
    if args.onchain and not args.proof:
        raise CliError("--onchain checks a proof's anchor: give --proof PROOF_FILE", code=2)
    receipt = load_receipt_file(Path(args.file))
    expected = await _pinned_keys(args)
    v = verify_receipt_message(receipt, expected)
    problems = list(v.problems)
    proof_result: dict[str, Any] | None = None
    if args.proof:
        proof = load_proof_file(Path(args.proof))
        proof_problems = check_receipt_proof(proof, receipt)
        problems += proof_problems
        proof_result = {
            "valid": not proof_problems,
            "batch_id": proof.batch_id,
            "leaf_index": proof.leaf_index,
            "leaf_count": proof.leaf_count,
            "merkle_root": proof.merkle_root.hex(),
            "anchor_network": proof.anchor_network,
            "anchor_transaction": proof.anchor_transaction,
        }
        if args.onchain:
            onchain = await _check_onchain(args, proof)
            problems += onchain["problems"]
            proof_result["onchain"] = onchain
    result: dict[str, Any] = {"valid": not problems, "problems": problems}
    if v.body is not None:
        result["receipt"] = to_dict(v.body)
    if proof_result is not None:
        result["proof"] = proof_result
    emit(result)
    return 0 if not problems else 1


async def _pinned_keys(args: argparse.Namespace) -> set[bytes]:
    """The coordinator keys `receipt verify` requires one of: --coordinator-key's, and those
    the --coordinator addresses state (each coordinator of a cluster has its own key)."""
    pinned: set[bytes] = set()
    for text in (args.coordinator_key or "").split(","):
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            raise CliError(f"--coordinator-key: {text.strip()!r} is not hex", code=2) from None
        if key and len(key) != 32:
            raise CliError("--coordinator-key: a key is 32 bytes (64 hex digits)", code=2)
        if key:
            pinned.add(key)
    if args.pin_coordinators:
        async with CoordinatorClient(args.pin_coordinators, keys.KeyPair.generate()) as c:
            found = await c.coordinator_keys()
        missing = [a for a in c.addresses if a not in found]
        if missing:
            raise CliError(f"--coordinator: no key from {', '.join(missing)} (unreachable?)")
        pinned |= set(found.values())
    return pinned


async def _check_onchain(
    args: argparse.Namespace, proof: receipt_pb2.GetReceiptProofResponse
) -> dict[str, Any]:
    """`receipt verify --onchain`: the proof's root and anchor transaction, on the chain of
    --profile."""
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError

    profile = load_profile(args.profile)
    try:
        return await asyncio.to_thread(
            registry.adapter_of(profile).check_anchor,
            profile,
            proof.merkle_root,
            proof.anchor_network,
            proof.anchor_transaction,
            args.anchorer or "",
        )
    except ChainConfigError as e:
        raise CliError(f"--onchain: {e}", code=2) from e


async def cmd_receipt_proof(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.coordinator, _existing_key(args, "client")) as c:
        proof = await c.receipt_proof(args.job_id)
        receipt = (await c.receipt(args.job_id)).receipt
    emit(proof_json(proof))
    problems = check_receipt_proof(proof, receipt)
    if problems:
        raise CliError("the proof does not verify: " + "; ".join(problems))
    return 0


# --- payouts ------------------------------------------------------------------------------


async def cmd_payouts_audit(args: argparse.Namespace) -> int:
    """Compares the coordinator's store with the chain (README "Workers earn") on every
    network the profile accepts payments on: exit 0 when every settlement, refund and
    payout it recorded moved exactly that on chain, else 1."""
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError
    from dispatchnet.errors import Unavailable
    from dispatchnet.payments.audit import AuditReport, audit
    from dispatchnet.store import registry as stores

    profile = _profile_with_store(args)
    data_dir = Path(args.coordinator_data or keys.default_home() / f"coordinator-{profile.name}")
    if (why := stores.missing(profile, data_dir)) is not None:
        raise CliError(f"{why} (pass --coordinator-data or --store)", code=2)
    # each chain as its own adapter sees it ([chain] when the profile accepts no payments)
    chains = registry.payment_profiles(profile) or [profile]
    try:
        store = await stores.open_store(profile, data_dir)
    except Unavailable as e:
        raise CliError(e.message) from e
    try:
        flows = [await store.audit_flows(on.chain.network) for on in chains]
    finally:
        await store.close()

    def run() -> list[AuditReport]:
        reports = []
        for on, (recorded, fees) in zip(chains, flows, strict=True):
            read = functools.partial(registry.adapter_of(on).token_flow, on, data_dir)
            reports.append(audit(on.chain.network, recorded, fees, read))
        return reports

    try:
        reports = await asyncio.to_thread(run)
    except ChainConfigError as e:
        raise CliError(str(e)) from e
    except Unavailable as e:
        raise CliError(e.message) from e
    clean = all(r.clean for r in reports)
    emit({"clean": clean, "networks": [r.as_dict() for r in reports]})
    return 0 if clean else 1


# --- local cluster ------------------------------------------------------------------------


async def cmd_cluster(args: argparse.Namespace) -> int:
    """`dispatch cluster up`: a local PostgreSQL and N coordinators sharing it (README
    "Failover"); prints their addresses as JSON and runs until SIGINT/SIGTERM."""
    from dispatchnet.cluster import ClusterError, LocalCluster
    from dispatchnet.store.local_postgres import PostgresNotFound, PostgresStartError

    load_profile(args.profile)  # a bad profile is one line, before anything starts
    data_dir = Path(args.data_dir or keys.default_home() / f"cluster-{Path(args.profile).stem}")
    try:
        async with LocalCluster(args.profile, data_dir, args.coordinators) as cluster:
            print(json.dumps(cluster.describe()), flush=True)
            await _until_signal()
    except (ClusterError, PostgresNotFound, PostgresStartError) as e:
        raise CliError(str(e)) from e
    return 0


# --- local chain --------------------------------------------------------------------------


async def cmd_chain(args: argparse.Namespace) -> int:
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError, DevChainError

    profile = load_profile(args.profile)
    chain = registry.adapter_of(profile)
    try:
        if args.chain_cmd == "up":
            emit(await asyncio.to_thread(chain.chain_up, profile, args.port))
            return 0
        if args.chain_cmd == "down":
            emit(await asyncio.to_thread(chain.chain_down, profile))
            return 0
        status = await asyncio.to_thread(chain.chain_status, profile)
    except (ChainConfigError, DevChainError) as e:
        raise CliError(str(e)) from e
    emit(status)
    return 0 if status["ok"] else 1


async def cmd_chain_reputation(args: argparse.Namespace) -> int:
    """An agent's reputation as the erc8004 source computes it, with its parts and the
    trusted reviewers' feedback entries behind it (README "Reputation and feedback")."""
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError
    from dispatchnet.chains.evm.node import resolve_evm_chain
    from dispatchnet.chains.evm.reputation import EvmReputationReader
    from dispatchnet.coordinator.jobs import FEEDBACK_TAG1
    from dispatchnet.errors import Unavailable
    from dispatchnet.reputation.erc8004 import explain

    profile = load_profile(args.profile)
    evm = registry.identity_profile(profile) or profile  # where the reputation registry is
    r = profile.reputation

    def read() -> dict[str, Any]:
        chain = resolve_evm_chain(evm.chain)
        reviewers = [*r.trusted_reviewers, *(args.reviewer or [])]
        reader = EvmReputationReader(chain, reviewers, FEEDBACK_TAG1)
        page = reader.feedback(args.agent_id, r.from_block)
        count, average = reader.summary(args.agent_id)
        clients = reader.contract.functions.getClients(args.agent_id).call()
        return {
            "agent_id": args.agent_id, "network": chain.network, "reviewers": reader.reviewers,
            "from_block": r.from_block, **explain(page, r.score_params()),
            "summary": {"count": count, "average": average if count else None},
            "untrusted_clients": [c for c in clients if c not in reader.reviewers],
        }  # fmt: skip

    try:
        emit(await asyncio.to_thread(read))
    except (ChainConfigError, Unavailable) as e:
        raise CliError(str(e)) from e
    return 0


async def cmd_wallet(args: argparse.Namespace) -> int:
    """The client's x402 wallet: a key of the profile's chain kind (README "Payments")."""
    from dispatchnet.chains import registry
    from dispatchnet.chains.deployments import ChainConfigError
    from dispatchnet.errors import Unavailable

    profile = load_profile(args.profile)
    chain = registry.adapter_of(profile)
    if args.wallet_cmd == "new":
        path = Path(args.key_file).expanduser()
        path = path if path.is_absolute() else keys.default_home() / path
        if path.exists():
            raise CliError(f"{path} exists already; it is the key of a wallet")
        try:
            address = chain.new_wallet_key(path)
        except ChainConfigError as e:
            raise CliError(str(e)) from e
        emit({"address": address, "key_file": str(path)})
        return 0
    if getattr(args, "max_payment", None) is not None:
        profile = profile.with_overrides(wallet={"max_per_job_micros": args.max_payment})
    try:
        wallet = chain.client_wallet(profile, args.wallet_key or "")
    except ChainConfigError as e:
        raise CliError(str(e)) from e
    if wallet is None:
        if "payments" not in registry.capabilities(profile.chain.kind):
            raise CliError(
                f"profile {profile.name} has no chain to pay on: a wallet needs a profile "
                "with a [chain] (e.g. --profile local-monad)"
            )
        how = "set [wallet] key_file or pass --wallet-key"
        if profile.chain.devchain:
            how = (
                "set [wallet] key_file, pass --wallet-key, or start its local chain "
                f"(`dispatch chain up --profile {args.profile}`) for the dev account"
            )
        raise CliError(f"profile {profile.name} has no wallet: {how}")
    if args.wallet_cmd == "address":
        emit({"address": wallet.address})
    elif args.wallet_cmd == "pay":
        print(await asyncio.to_thread(wallet.pay, args.payment_required.strip()))
    else:
        try:
            emit(await asyncio.to_thread(chain.wallet_balances, profile, wallet))
        except (Unavailable, ChainConfigError) as e:
            raise CliError(str(e)) from e
    return 0


async def cmd_mcp(args: argparse.Namespace) -> int:
    """The MCP server (README "MCP"): stdio, or streamable HTTP at http://HOST:PORT/mcp."""
    from dispatchnet.gateways.mcp import DispatchMcp, McpSettings, describe, serve_stdio
    from dispatchnet.gateways.mcp_http import serve_http
    from dispatchnet.sdk import InvalidRequest, Network

    profile = load_profile(args.profile)
    if args.max_payment is not None:
        profile = profile.with_overrides(wallet={"max_per_job_micros": args.max_payment})
    if args.no_wallet:  # callers pay: no key file is read
        profile = profile.with_overrides(wallet={"key_file": ""})
    coordinators = [a.strip() for a in (args.coordinator or "").split(",") if a.strip()]
    try:
        network = Network.from_profile(profile, coordinators, wallet_key_file=args.wallet_key or "")
    except InvalidRequest as e:
        raise CliError(str(e)) from e
    if args.no_wallet:
        network = dataclasses.replace(network, wallet=None)
    if args.transport == "http" and args.listen is None:
        args.listen = DEFAULT_MCP_LISTEN
    host, port = _host_port(args.listen) if args.transport == "http" else ("", 0)
    token = _mcp_token(args)
    settings = McpSettings(
        network,
        _client_key(args),
        max_price_micros=profile.wallet.max_per_job_micros,
        budget_micros=args.budget,
        hosted=args.hosted,
    )
    info = {"transport": args.transport, "profile": profile.name, **describe(settings)}
    mcp = DispatchMcp(settings)
    signalled = False
    try:
        if args.transport == "stdio":
            logging.getLogger("dispatch.mcp").info("serving on stdio: %s", json.dumps(info))
            signalled = await _until_signal_or(serve_stdio(mcp))
        else:
            listening = False

            def announce(url: str) -> None:
                nonlocal listening
                listening = True
                print(json.dumps({"mcp": url, **info}), flush=True)

            try:
                await serve_http(mcp, host, port, token, announce)
            except OSError as e:
                if listening:
                    raise CliError(str(e)) from e
                raise CliError(f"cannot listen on {args.listen}: {e.strerror or e}") from e
            except ValueError as e:
                raise CliError(str(e)) from e
    finally:
        await mcp.drain(10)  # calls still open (the server stopped) cancel their jobs
        await mcp.close()
    if signalled:  # the stdin reader's thread may be blocked in a read: do not wait for it
        logging.shutdown()
        os._exit(0)
    return 0


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CliError(f"--listen must be HOST:PORT, not {listen!r}", 2)
    return host, int(port)


def _mcp_token(args: argparse.Namespace) -> str:
    """The bearer token HTTP callers must send: --token-file, else $DISPATCH_MCP_TOKEN."""
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text().strip()
        except OSError as e:
            raise CliError(f"--token-file: {e}") from e
        if not token:
            raise CliError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("DISPATCH_MCP_TOKEN", "").strip()


async def _until_signal_or(work: Awaitable[None]) -> bool:
    """Awaits work until SIGINT/SIGTERM, which cancels it (not waiting for it: the stdio
    transport's reader may be blocked in a read). Whether a signal stopped it."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(_until_signal())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not task.done():
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the tool calls in flight
        return True
    task.result()
    return False


async def cmd_auth_header(args: argparse.Namespace) -> int:
    value = metadata_value(_client_key(args), args.ttl)
    if args.raw:
        print(value)
    else:
        print(f"-H '{METADATA_KEY}: {value}'")
    return 0


async def cmd_keys_show(args: argparse.Namespace) -> int:
    emit({"client_id": _client_key(args).public_hex})
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    from dispatchnet.bench import run_bench

    if args.most_seekers < args.seekers:
        raise CliError(
            f"--most-seekers ({args.most_seekers}) must be at least --seekers ({args.seekers})"
        )
    return await run_bench(
        seconds=args.seconds, many=args.submitters, scale=args.seekers, most=args.most_seekers
    )


async def cmd_demo(args: argparse.Namespace) -> int:
    if args.cluster:
        from dispatchnet.demo_cluster import run_cluster_demo

        return await run_cluster_demo()
    from dispatchnet.demo import run_demo

    code: int = await run_demo(keep_open=args.keep_open)
    return code


# --- parser -------------------------------------------------------------------------------

N = TypeVar("N", int, float)
SCALE_BASE_SEEKERS = 50  # bench.SCALE_BASE (not imported here: the bench module is heavy)
MOST_BENCH_SEEKERS = 100_000


def bounded(kind: Callable[[str], N], low: N, high: N | None = None) -> Callable[[str], N]:
    """An argparse type: kind(text), from low to high (None: no upper bound; a float must
    be finite). Outside, argparse exits 2 naming the option: "argument --ttl: must be
    between 1 and 86400, not 0"."""

    def parse(text: str) -> N:
        value = kind(text)  # ValueError: argparse's "invalid int value: 'x'"
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and low <= value and (high is None or value <= high)):
            span = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names the type with it
    return parse


def add_lie_rate(p: argparse.ArgumentParser) -> None:
    """--lie-rate of `dispatch worker` and `dispatch seekers`."""
    p.add_argument(
        "--lie-rate",
        type=bounded(float, 0, 1),
        default=0.0,
        metavar="P",
        help="DEMO/TEST ONLY: return wrong output (properly signed) for this fraction of jobs, "
        "to watch verification catch it (README 'Verification')",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatch", description="Dispatch compute network")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="logs on stderr for people, or JSON lines (default: env DISPATCH_LOG_FORMAT, "
        "else human)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def coord_option(sp: argparse.ArgumentParser, profile: bool = False) -> None:
        """--coordinator, and with `profile` a --profile only for its [cluster] (commands
        whose --profile says more add their own)."""
        sp.add_argument(
            "--coordinator",
            help="coordinator address HOST:PORT, or several comma-separated (coordinators "
            "sharing one database: failover); default $DISPATCH_COORDINATOR, else the "
            f"--profile's [cluster] coordinators, else {DEFAULT_COORDINATOR}",
        )
        if profile:
            sp.add_argument("--profile", help="profile whose [cluster] coordinators to connect to")
        sp.set_defaults(resolve_coordinator=True)

    def with_coord(
        sp: argparse.ArgumentParser, key_help: str = "client key file", profile: bool = False
    ) -> None:
        coord_option(sp, profile)
        sp.add_argument("--key-file", help=f"{key_help} (default under $DISPATCH_HOME)")

    c = sub.add_parser("coordinator", help="run a coordinator")
    c.add_argument("--profile", default="local", help="profile name or .toml path")
    c.add_argument("--listen", help="HOST:PORT (port 0 picks a free port)")
    c.add_argument("--data-dir", help="where the database and coordinator key live")
    c.add_argument(
        "--store",
        help="where the coordinator keeps its state: postgresql://USER@HOST:PORT/DB or "
        "sqlite:PATH (default: the profile's [store] url; empty: SQLite in --data-dir)",
    )
    c.add_argument(
        "--metrics-listen",
        help="HOST:PORT of the Prometheus /metrics endpoint ('' off; default: the profile's)",
    )
    c.add_argument(
        "--dashboard-listen",
        help="HOST:PORT of the operator dashboard ('' off; default: the profile's)",
    )
    c.set_defaults(fn=cmd_coordinator)

    g = sub.add_parser(
        "gateway", help="serve the OpenAI-compatible HTTP gateway (paid with x402 over HTTP)"
    )
    g.add_argument("--profile", default="local", help="profile name or .toml path")
    g.add_argument("--listen", default="127.0.0.1:8402", help="HOST:PORT (port 0: a free port)")
    g.add_argument(
        "--coordinator",
        help="coordinator address(es) HOST:PORT, comma-separated (default "
        "$DISPATCH_COORDINATOR, else the profile's [server] listen)",
    )
    g.add_argument(
        "--key-file", help="the gateway's client key (default $DISPATCH_HOME/gateway.key)"
    )
    g.add_argument("--coordinator-key", help="require receipts countersigned by this key (hex)")
    g.add_argument(
        "--max-price-micros",
        type=bounded(int, 0),
        default=100_000,
        help="the most one job may cost, micro-USD (default 100000; 0: no limit)",
    )
    g.add_argument(
        "--hosted-budget-micros",
        type=bounded(int, 0),
        default=0,
        help="total the hosted fallback (OpenAI/Anthropic keys from the environment, free to "
        "callers) may cost, micro-USD (default 0: no fallback)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=bounded(int, 1),
        default=4 * 1024 * 1024,
        help="largest request body",
    )
    g.add_argument(
        "--max-concurrent", type=bounded(int, 1), default=64, help="job requests in flight"
    )
    g.set_defaults(fn=cmd_gateway)

    w = sub.add_parser("worker", help="run a worker")
    with_coord(w, "worker key file", profile=True)
    w.add_argument("--kind", choices=["seeker", "desktop"], default="seeker")
    w.add_argument(
        "--max-concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        default=4,
        help=f"jobs at once (1-{MAX_CONCURRENCY})",
    )
    w.add_argument(
        "--drain-timeout",
        type=bounded(float, 0),
        default=60.0,
        help="seconds SIGTERM waits for running jobs",
    )
    w.add_argument(
        "--llm-backend",
        choices=["embedded", "openai", "none"],
        help="LLM for desktops (default embedded: the shipped model, in-process; seekers: none)",
    )
    w.add_argument("--llm-url", help="OpenAI-compatible API root for openai, e.g. .../v1")
    w.add_argument("--model", help="model name to serve and advertise (required for openai)")
    w.add_argument("--model-path", help="GGUF file for the embedded backend")
    w.add_argument(
        "--agent-file",
        help="agent file from `dispatch worker register` (default: next to the worker key, "
        "*.agent.json, when it exists)",
    )
    add_lie_rate(w)
    w.set_defaults(fn=cmd_worker)
    wsub = w.add_subparsers(dest="worker_cmd")
    wr = wsub.add_parser(
        "register", help="register the worker as an agent in the profile's IdentityRegistry"
    )
    with_coord(wr, "worker key file")
    wr.add_argument("--profile", default="local-monad", help="profile name or .toml path")
    wr.add_argument(
        "--chain-key-file",
        help="the worker's secp256k1 chain key (default: next to the worker key, *.chain.key; "
        "created 0600 when missing)",
    )
    wr.add_argument(
        "--solana-key-file",
        help="with a profile whose identities live on an [identity_chain] (local-solana): the "
        "worker's Solana keypair, named in its registration (default: next to the worker "
        "key, *.solana.key; created 0600 when missing)",
    )
    wr.add_argument("--name", help="agent name in the registration file")
    wr.add_argument("--description", default="Dispatch compute worker (dispatch.v1)")
    wr.add_argument(
        "--endpoint", help="gRPC endpoint in the registration file (default: --coordinator)"
    )

    we = wsub.add_parser(
        "earnings", help="the worker's balance, share per job and payouts (signed with its key)"
    )
    with_coord(we, "worker key file")
    we.add_argument(
        "--page-size",
        type=bounded(int, 0, MAX_EARNINGS_PAGE),
        default=0,
        help=f"jobs per page (1-{MAX_EARNINGS_PAGE}; 0: {MAX_EARNINGS_PAGE})",
    )
    we.add_argument("--page-token", help="next_page_token of a previous call")
    we.add_argument("--all", action="store_true", help="follow every page of jobs")
    we.add_argument(
        "--profile",
        help="also read the balance of each payout address on this profile's chains, next "
        "to the payouts that landed there (profile name or .toml path)",
    )

    sk = sub.add_parser("seekers", help="simulate many mobile seekers in one process")
    coord_option(sk, profile=True)
    sk.add_argument("--count", type=bounded(int, 1), required=True, help="how many seekers")
    sk.add_argument("--seed", type=int, help="makes devices and drops reproducible")
    sk.add_argument(
        "--max-concurrency",
        type=bounded(int, 1, MAX_CONCURRENCY),
        default=1,
        help=f"jobs per seeker at once (1-{MAX_CONCURRENCY})",
    )
    sk.add_argument(
        "--flaky",
        type=bounded(float, 0, 1),
        default=0.0,
        metavar="P",
        help="drop probability per 5 s tick",
    )
    sk.add_argument("--battery", action="store_true", help="reject offers below 20%% battery")
    sk.add_argument("--heat", action="store_true", help="reject offers when the device is hot")
    sk.add_argument(
        "--slow",
        type=bounded(float, 1),
        default=1.0,
        metavar="F",
        help="device speed factors in [1, F]",
    )
    sk.add_argument("--key-dir", help="keep the seekers' keys here (default: ephemeral keys)")
    add_lie_rate(sk)
    sk.add_argument(
        "--drain-timeout",
        type=bounded(float, 0),
        default=30.0,
        help="seconds SIGTERM waits for running jobs",
    )
    sk.set_defaults(fn=cmd_seekers)

    j = sub.add_parser("job", help="submit and follow jobs")
    jsub = j.add_subparsers(dest="job_cmd", required=True)
    s = jsub.add_parser("submit", help="quote, commit and optionally wait for a job")
    with_coord(s)
    work = s.add_mutually_exclusive_group(required=True)
    work.add_argument("--task", help="task name, e.g. echo or sha256")
    work.add_argument("--wasm", metavar="FILE", help="run a WebAssembly module (.wasm or .wat)")
    work.add_argument("--prompt", help="run an LLM job with this user prompt (desktops only)")
    s.add_argument("--input", help="task input as JSON (raw text with --wasm)")
    s.add_argument("--use-llm", action="store_true", help="run a text task with an LLM")
    s.add_argument("--model", help="LLM model the worker must serve (default: any)")
    s.add_argument(
        "--max-tokens",
        type=bounded(int, 0, UINT32_MAX),
        help="LLM tokens to generate at most (0: the coordinator's default)",
    )
    s.add_argument(
        "--temperature", type=bounded(float, 0, 2), help="LLM sampling temperature in [0, 2]"
    )
    s.add_argument("--policy", choices=sorted(POLICIES), default="auto")
    s.add_argument(
        "--private",
        action="store_true",
        help="only paired workers may run it; input and output are encrypted end to end",
    )
    s.add_argument(
        "--verify",
        type=int,
        choices=(1, 2, 3),
        help="run a task on this many independent workers and return the majority's output "
        "(priced that many times; README 'Verification')",
    )
    s.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    s.add_argument(
        "--wait",
        action="store_true",
        help="wait for the final state (one RunJob call: commit and wait together)",
    )
    s.add_argument(
        "--profile",
        default="local",
        help="profile whose [wallet] pays when the coordinator asks for x402 payment",
    )
    s.add_argument("--wallet-key", metavar="FILE", help="pay with this chain key file instead")
    s.add_argument(
        "--max-payment",
        type=bounded(int, 0),
        metavar="MICRO_USD",
        help="most this job may cost (default: the profile's [wallet] max_per_job_micros)",
    )
    s.add_argument("--no-pay", action="store_true", help="never pay (commit fails if asked)")
    s.set_defaults(fn=cmd_job_submit)
    for name, fn, hlp in (
        ("get", cmd_job_get, "show a job"),
        ("watch", cmd_job_watch, "stream a job's events"),
        ("cancel", cmd_job_cancel, "cancel a job"),
    ):
        sp = jsub.add_parser(name, help=hlp)
        with_coord(sp, profile=True)
        sp.add_argument("job_id")
        if name == "watch":
            sp.add_argument(
                "--after",
                type=bounded(int, 0, UINT64_MAX),
                default=0,
                help="resume after this sequence",
            )
        if name == "cancel":
            sp.add_argument("--reason")
        sp.set_defaults(fn=fn)

    ws = sub.add_parser("workers", help="list connected workers")
    coord_option(ws, profile=True)
    ws.set_defaults(fn=cmd_workers)

    pr = sub.add_parser("pair", help="pair clients and workers for PRIVATE jobs")
    psub = pr.add_subparsers(dest="pair_cmd", required=True)
    pc = psub.add_parser("create", help="(client) create a pairing code")
    with_coord(pc, profile=True)
    pc.add_argument(
        "--ttl",
        type=bounded(int, 0, MAX_PAIRING_TTL),
        default=0,
        help=f"seconds the code stays valid (at most {MAX_PAIRING_TTL}; 0: the coordinator's "
        "default, an hour)",
    )
    pl = psub.add_parser("claim", help="(worker) claim a code with the worker key")
    with_coord(pl, "worker key file (must exist)", profile=True)
    pl.add_argument("code")
    pli = psub.add_parser("list", help="list your pairings")
    with_coord(pli, "client key file (must exist)", profile=True)
    pli.add_argument("--all", action="store_true", help="include revoked pairings")
    prv = psub.add_parser("revoke", help="revoke a pairing")
    with_coord(prv, "client key file (must exist)", profile=True)
    prv.add_argument("pairing_id")
    pr.set_defaults(fn=cmd_pair)

    r = sub.add_parser("receipt", help="receipts")
    rsub = r.add_subparsers(dest="receipt_cmd", required=True)
    rv = rsub.add_parser("verify", help="verify a receipt offline (exit 0 only if valid)")
    rv.add_argument("file", help="JSON from `job submit --wait` or `job get`, or a Receipt")
    rv.add_argument(
        "--coordinator-key",
        help="require one of these coordinator public keys (hex, comma-separated)",
    )
    rv.add_argument(
        "--coordinator",
        dest="pin_coordinators",
        metavar="ADDRESSES",
        help="require a countersignature by one of these coordinators (HOST:PORT, "
        "comma-separated: a cluster), each asked for its key",
    )
    rv.add_argument(
        "--proof",
        metavar="PROOF_FILE",
        help="also check this Merkle proof (JSON from `receipt proof`) against the receipt",
    )
    rv.add_argument(
        "--onchain",
        action="store_true",
        help="also check on chain that the proof's root is anchored by its anchor transaction",
    )
    rv.add_argument(
        "--profile", default="local-monad", help="the chain for --onchain (profile or .toml)"
    )
    rv.add_argument("--anchorer", help="with --onchain: require this anchoring address")
    rv.set_defaults(fn=cmd_receipt_verify)
    rp = rsub.add_parser(
        "proof",
        help="print a receipt's Merkle inclusion proof and check it (exit 0 only if it holds)",
    )
    with_coord(rp, "client key file (must exist)", profile=True)
    rp.add_argument("job_id")
    rp.set_defaults(fn=cmd_receipt_proof)

    po = sub.add_parser("payouts", help="worker payouts")
    posub = po.add_subparsers(dest="payouts_cmd", required=True)
    pa = posub.add_parser(
        "audit", help="compare the coordinator's store with the chain (exit 1 on a difference)"
    )
    pa.add_argument("--profile", default="local-monad", help="profile name or .toml path")
    pa.add_argument(
        "--coordinator-data",
        metavar="DIR",
        help="the coordinator's --data-dir (default: coordinator-<profile> in $DISPATCH_HOME)",
    )
    pa.add_argument("--store", help="the coordinator's --store (default: the profile's)")
    pa.set_defaults(fn=cmd_payouts_audit)

    cl = sub.add_parser("cluster", help="a local cluster: PostgreSQL and coordinators sharing it")
    clsub = cl.add_subparsers(dest="cluster_cmd", required=True)
    cup = clsub.add_parser(
        "up", help="start a local PostgreSQL and N coordinators on it; runs until Ctrl-C"
    )
    cup.add_argument(
        "--coordinators", type=bounded(int, 1, 16), default=3, help="how many (1-16, default 3)"
    )
    cup.add_argument("--profile", default="local", help="the coordinators' profile")
    cup.add_argument(
        "--data-dir",
        help="the database's and the coordinators' directories (default: cluster-<profile> "
        "in $DISPATCH_HOME)",
    )
    cl.set_defaults(fn=cmd_cluster)

    ch = sub.add_parser(
        "chain", help="a chain profile's local chain (anvil for EVM, a LiteSVM node for Solana)"
    )
    chsub = ch.add_subparsers(dest="chain_cmd", required=True)
    cu = chsub.add_parser(
        "up",
        help="start the local chain (anvil: deploy the contracts; Solana: a test USDC mint), "
        "fund demo accounts (idempotent)",
    )
    cu.add_argument(
        "--port",
        type=bounded(int, 0, 65535),
        help="the chain's port (default [chain] devchain_port; 0: any)",
    )
    chsub.add_parser("down", help="stop the local chain and remove its deployment file")
    chsub.add_parser("status", help="where the profile's chain is and whether it answers")
    cr = chsub.add_parser(
        "reputation",
        help="an agent's score from its trusted reviewers' feedback, with its parts",
    )
    cr.add_argument("agent_id", type=bounded(int, 0, 2**256 - 1), help="a uint256")
    cr.add_argument(
        "--reviewer", action="append", help="also trust this reviewer address (repeatable)"
    )
    cr.set_defaults(fn=cmd_chain_reputation)
    for sp in chsub.choices.values():
        sp.add_argument("--profile", default="local-monad", help="profile name or .toml path")
    ch.set_defaults(fn=cmd_chain)

    wl = sub.add_parser("wallet", help="the x402 wallet `job submit` pays with")
    wsub = wl.add_subparsers(dest="wallet_cmd", required=True)
    wn = wsub.add_parser(
        "new", help="create a wallet key file of the profile's chain kind (mode 0600)"
    )
    wn.add_argument("--profile", default="local-monad", help="profile name or .toml path")
    wn.add_argument(
        "--key-file", default="wallet.key", help="where (default: wallet.key in $DISPATCH_HOME)"
    )
    wn.set_defaults(fn=cmd_wallet)
    for name, hlp in (
        ("address", "the wallet's address"),
        ("balance", "the wallet's stablecoin balances on the profile's chain"),
        ("pay", "sign a payment-signature for a payment-required trailer (for grpcurl)"),
    ):
        sp = wsub.add_parser(name, help=hlp)
        sp.add_argument("--profile", default="local-monad", help="profile name or .toml path")
        sp.add_argument("--wallet-key", metavar="FILE", help="this key file instead of [wallet]'s")
        if name == "pay":
            sp.add_argument("payment_required", help="the payment-required trailer's value")
            sp.add_argument(
                "--max-payment",
                type=bounded(int, 0),
                metavar="MICRO_USD",
                help="most this may cost",
            )
        sp.set_defaults(fn=cmd_wallet)

    m = sub.add_parser(
        "mcp", help="serve the network as MCP tools (stdio, or streamable HTTP at /mcp)"
    )
    m.add_argument(
        "--profile", default="local", help="profile: its chain track, coordinator and [wallet]"
    )
    m.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    m.add_argument(
        "--listen",
        help=f"HTTP: HOST:PORT (default {DEFAULT_MCP_LISTEN}; port 0 picks a free port)",
    )
    m.add_argument(
        "--coordinator",
        help="coordinator HOST:PORT, comma-separated to fail over "
        "(default $DISPATCH_COORDINATOR, else the profile's [server] listen)",
    )
    m.add_argument("--key-file", help="client key file (default under $DISPATCH_HOME)")
    pays = m.add_mutually_exclusive_group()
    pays.add_argument("--wallet-key", metavar="FILE", help="pay with this chain key file instead")
    pays.add_argument(
        "--no-wallet",
        action="store_true",
        help="never pay from a wallet: callers pay each job with x402 (_meta x402/payment)",
    )
    m.add_argument(
        "--max-payment",
        type=bounded(int, 0),
        metavar="MICRO_USD",
        help="most one job may cost, whoever pays (default: [wallet] max_per_job_micros)",
    )
    m.add_argument(
        "--budget",
        type=bounded(int, 0),
        default=1_000_000,
        metavar="MICRO_USD",
        help="most the server itself spends while it runs: its wallet and hosted estimates "
        "(default 1000000, $1)",
    )
    m.add_argument(
        "--hosted",
        action="store_true",
        help="let calls that carry no x402 payment fall back to OpenAI/Anthropic (the "
        "operator's keys, from the environment) when the network cannot serve them",
    )
    m.add_argument(
        "--token-file",
        help="HTTP: callers must send `Authorization: Bearer <token>` (env DISPATCH_MCP_TOKEN); "
        "required on a non-loopback address",
    )
    m.set_defaults(fn=cmd_mcp)

    a = sub.add_parser("auth", help="credentials for grpcurl and other clients")
    asub = a.add_subparsers(dest="auth_cmd", required=True)
    ah = asub.add_parser("header", help="print the -H metadata for grpcurl")
    ah.add_argument("--key-file", help="client key file (default under $DISPATCH_HOME)")
    ah.add_argument(
        "--ttl",
        type=bounded(int, 1, MAX_TOKEN_TTL),
        default=3600,
        help=f"token lifetime in seconds (1-{MAX_TOKEN_TTL}, what coordinators accept by "
        "default; default 3600)",
    )
    ah.add_argument("--raw", action="store_true", help="print only the metadata value")
    ah.set_defaults(fn=cmd_auth_header)
    ak = asub.add_parser("whoami", help="print your client id")
    ak.add_argument("--key-file", help="client key file (default under $DISPATCH_HOME)")
    ak.set_defaults(fn=cmd_keys_show)

    d = sub.add_parser(
        "demo",
        help="run the end-to-end demo on both chain tracks (EVM on anvil, Solana on a local "
        "node), each with its own local coordinator",
    )
    d.add_argument(
        "--keep-open",
        action="store_true",
        help="at the end of each chain's run, keep its dashboard up until Enter",
    )
    d.add_argument(
        "--cluster",
        action="store_true",
        help="the EVM scenarios across 3 coordinators on one PostgreSQL, one killed mid-run",
    )
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser(
        "bench",
        help="measure jobs against a raw gRPC baseline, unpaid and paid (x402), and 1 vs 2 "
        "coordinators on PostgreSQL",
    )
    b.add_argument(
        "--seconds",
        type=bounded(float, 0.1, 3600.0),
        default=5.0,
        help="length of each measurement",
    )
    b.add_argument(
        "--submitters",
        type=bounded(int, 1, 10000),
        default=64,
        help="concurrent submitters of the throughput runs (unpaid, cluster)",
    )
    b.add_argument(
        "--seekers",
        type=bounded(int, SCALE_BASE_SEEKERS + 1, MOST_BENCH_SEEKERS),
        default=5000,
        help=f"connected seekers of the scale section (compared with {SCALE_BASE_SEEKERS})",
    )
    b.add_argument(
        "--most-seekers",
        type=bounded(int, SCALE_BASE_SEEKERS + 1, MOST_BENCH_SEEKERS),
        default=10000,
        help="the most connected seekers of the scale section: the coordinator's memory "
        "and idle CPU with them (several `dispatch seekers` processes, 1,000 each)",
    )
    b.set_defaults(fn=cmd_bench)
    return p


def describe_payment_required(value: str) -> str:
    """What a payment-required trailer asks for, for people."""
    try:
        data = json.loads(base64.b64decode(value))
        lines = [f"payment required ({data.get('error') or 'no reason given'}); accepted:"]
        for a in data.get("accepts") or []:
            lines.append(
                f"  {a.get('amount')} atomic units of {a.get('asset')} on {a.get('network')} "
                f"to {a.get('payTo')} ({a.get('scheme')}, within {a.get('maxTimeoutSeconds')}s)"
            )
        lines.append(
            "pay with `job submit --profile <profile with a [wallet]>` or --wallet-key FILE"
        )
        return "\n".join(lines)
    except (ValueError, TypeError, AttributeError):
        return "payment required (the payment-required trailer does not parse)"


def run(fn: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    try:
        return eventloop.run(fn(args))  # type: ignore[arg-type]
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        required = trailer(e.trailing_metadata(), PAYMENT_REQUIRED)
        if required:
            print(describe_payment_required(required), file=sys.stderr)
        return 1
    except (ProfileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def resolve_coordinator(args: argparse.Namespace) -> None:
    """Fills in --coordinator when it was not given: $DISPATCH_COORDINATOR, else the
    --profile's [cluster] coordinators, else DEFAULT_COORDINATOR (comma-separated)."""
    if not getattr(args, "resolve_coordinator", False) or args.coordinator:
        return
    env = os.environ.get("DISPATCH_COORDINATOR", "").strip()
    if env:
        args.coordinator = env
        return
    profile = getattr(args, "profile", None)
    if profile:
        try:
            cluster = load_profile(profile).cluster.coordinators
        except ProfileError:
            cluster = []  # the command reports a bad profile itself, if it uses one
        if cluster:
            args.coordinator = ",".join(cluster)
            return
    args.coordinator = DEFAULT_COORDINATOR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format is None:  # --log-format wins over the environment
        env = os.environ.get("DISPATCH_LOG_FORMAT", "").strip().lower()
        if env and env not in logs.FORMATS:
            parser.error(f"DISPATCH_LOG_FORMAT must be {' or '.join(logs.FORMATS)}, not {env!r}")
        args.log_format = env or "human"
    resolve_coordinator(args)
    logs.configure(args.log_format, args.verbose)
    if not args.verbose:  # the x402 SDK logs every signature, the mcp SDK each session
        logging.getLogger("x402").setLevel(logging.WARNING)
        logging.getLogger("mcp").setLevel(logging.WARNING)
    try:
        tracing.configure(f"dispatch-{args.cmd}")
    except tracing.TracingConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        with contextlib.suppress(BrokenPipeError):
            return run(args.fn, args)
        return 1
    finally:
        tracing.shutdown()  # sends the spans still buffered


if __name__ == "__main__":
    sys.exit(main())
