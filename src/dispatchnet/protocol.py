"""Wire-protocol constants shared by the coordinator, the worker and the clients.

Limits on what a worker may send on WorkerService.Connect (documented field by field in
proto/dispatch/v1/worker.proto). The coordinator checks them at the edge and ends the
stream with INVALID_ARGUMENT beyond them; the worker runtime keeps within them. String
limits count characters, byte limits bytes.
"""

from __future__ import annotations

import re

# A task's name (JobSpec.task.name, WorkerCapabilities.tasks): checked alike by the
# coordinator and by the gateway before it asks the coordinator.
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
TASK_NAME_RULE = '1-64 of a-z 0-9 _ . - (e.g. "echo")'

HELLO_CONTEXT = b"dispatch.v1.WorkerHello\n"

# Hello
MAX_CONCURRENCY = 64  # Capabilities.max_concurrency: 1 to this
MAX_TASKS = 256  # Capabilities.tasks entries (each a task name, at most 64 characters)
MAX_LLM_MODELS = 64  # Capabilities.llm_models entries (each at most 128 characters)
MAX_VERSION_CHARS = 128  # Hello.version
MAX_AGENT_ID_CHARS = 78  # Hello.agent_id: a uint256 in decimal has at most 78 digits
# Hello.running and Heartbeat.running_job_ids entries: what a worker runs, plus results
# not yet acknowledged, is at most a few times MAX_CONCURRENCY.
MAX_RUNNING_JOBS = 128
MAX_SIGNATURE_BYTES = 128  # ChallengeResponse signature / chain_ / solana_signature, receipts

# Every message about a job
MAX_JOB_ID_CHARS = 64  # job_id (the coordinator's ids are 36 characters)

# After the handshake
MAX_REASON_CHARS = 256  # OfferResponse.reason, Drain.reason
MAX_PROGRESS_TEXT_CHARS = 16384  # JobProgress.text (longer output goes in several messages)
# JobProgress.text over one attempt, all its messages together (an LLM's longest output is
# a few percent of it); beyond, the worker's session ends with a GoAway saying so
MAX_PROGRESS_CHARS_PER_ATTEMPT = 1 << 20
MAX_FAILURE_CODE_CHARS = 64  # JobFailed.failure.code
MAX_FAILURE_MESSAGE_CHARS = 2048  # JobFailed.failure.message
MAX_CONTENT_TYPE_CHARS = 128  # JobCompleted.result.content_type
MAX_RECEIPT_BODY_BYTES = 16384  # JobCompleted.receipt_body
# JobOffer / JobCompleted / JobFailed.traceparent: a W3C traceparent (version 00)
MAX_TRACEPARENT_CHARS = 55

# What the coordinator sends: ConnectResponse.acks (to a worker whose Hello sets
# batched_acks) holds at most this many, and an ack waits at most this long for a
# message to ride on before it is sent alone.
MAX_ACKS_PER_MESSAGE = 64
ACK_DELAY_SECONDS = 0.05

# HTTP/2 flow control of connections to the coordinator, set alike on its server, on the
# worker's channel and on the client SDK's: a fixed stream window (announced as
# INITIAL_WINDOW_SIZE) instead of gRPC C-core's bandwidth-delay probing. The probing sends
# a PING (and gets its ack) on a connection that carries data after a quiet spell; a
# worker holding one idle stream is always such a connection, so each small job cost ~2
# pings each way on top of its 2-3 messages (measured with 5,000 seekers: a seeker's
# writes per job 4.5 -> 1.0-1.3, the simulators' CPU per job down a quarter, idle CPU
# halved). 1 MiB, the fixed window grpc-go and grpc-java start with, takes a 4 MiB
# message across in a few round trips on a slow link.
HTTP2_WINDOW_BYTES = 1 << 20
HTTP2_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES),
)

# Client requests (coordinator.proto, receipt.proto, trust.proto), checked at the edge
# (api/bounds.py) before anything looks them up; INVALID_ARGUMENT beyond.
MAX_ID_CHARS = 64  # job_id, quote_id, pairing_id (the coordinator's ids are under 40)
MAX_IDEMPOTENCY_KEY_CHARS = 128  # CommitJobRequest.idempotency_key
MAX_PAIRING_CODE_CHARS = 32  # ClaimPairingRequest.code (XXXX-XXXX; dashes, spaces ignored)
MAX_PAGE_TOKEN_CHARS = 128  # GetEarningsRequest.page_token
MAX_EARNINGS_PAGE = 100  # GetEarningsRequest.page_size: 1 to this (0 and more mean this)
MAX_CANCEL_REASON_CHARS = 512  # CancelJobRequest.reason (stored with the job)
MAX_PAIRING_TTL_SECONDS = 86400  # CreatePairingCodeRequest.ttl_seconds (0: the default)

# Sealed input of PRIVATE jobs (common.proto SealedInput), checked at GetQuote
# LlmRequest.messages: the default of the coordinator's [limits] max_llm_messages, which
# the gateway, the MCP server and the SDK check before sending
MAX_LLM_MESSAGES = 256
MAX_SEALED_ENVELOPES = 16  # SealedInput.envelopes: one per recipient worker
SEALED_OVERHEAD_BYTES = 4096  # a box beyond the plaintext limits: nonce, MAC, framing


def coordinator_addresses(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """The coordinator addresses of a `--coordinator A,B,C` value (or a list of them):
    HOST:PORT each, in order, blanks and repeats dropped. ValueError when none is left.
    Workers and clients fail over between them (README "Failover")."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    out = list(dict.fromkeys(a.strip() for a in parts if a and a.strip()))
    if not out:
        raise ValueError("at least one coordinator address (HOST:PORT) is needed")
    return out
