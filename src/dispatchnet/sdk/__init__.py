"""The Dispatch client SDK: run LLM jobs and tasks on the network, paid with x402 from your
wallet, with verified receipts, and a hosted fallback (OpenAI, Anthropic; your own keys)
when the network cannot serve. README "SDK" is the manual.

    from dispatchnet.sdk import ComputeRouter, Network

    async with ComputeRouter([Network.from_profile("local-monad")]) as router:
        result = await router.run_llm("Name three colors.", max_tokens=32)
        print(result.output, result.route, result.price.usd, result.worker)

Public message types (receipts, payments, jobs, workers) are the betterproto dataclasses
of dispatchnet.sdk.types, generated from proto/dispatch/v1 (`make proto`).
"""

from dispatchnet.client import Payer
from dispatchnet.sdk import types
from dispatchnet.sdk.convert import llm_spec, task_spec
from dispatchnet.sdk.errors import (
    AuthError,
    CoordinatorUnavailable,
    DeadlineExceeded,
    DispatchError,
    HostedError,
    InvalidRequest,
    JobFailed,
    NoCapacity,
    NotFound,
    PaymentDeclined,
    PaymentError,
    PaymentRejected,
    PaymentRequired,
    PermissionDenied,
    RateLimited,
    ReceiptInvalid,
    Skip,
    SpendingLimitExceeded,
)
from dispatchnet.sdk.hosted import (
    AnthropicProvider,
    HostedProvider,
    HostedReply,
    HostedRequest,
    ModelPrice,
    OpenAIProvider,
    PriceTable,
    providers_from_env,
)
from dispatchnet.sdk.networks import ANY, Network
from dispatchnet.sdk.relay import RelayedPayment
from dispatchnet.sdk.result import ComputeResult, Price, Route, WorkerRef
from dispatchnet.sdk.router import CallOptions, ComputeRouter, ComputeStream
from dispatchnet.sdk.spending import SpendingLimits
from dispatchnet.sdk.sync import SyncComputeRouter, SyncComputeStream
from dispatchnet.sdk.verify import Expected, ReceiptCheck, verify_receipt

__all__ = [
    "ANY",
    "AnthropicProvider",
    "AuthError",
    "CallOptions",
    "ComputeResult",
    "ComputeRouter",
    "ComputeStream",
    "CoordinatorUnavailable",
    "DeadlineExceeded",
    "DispatchError",
    "Expected",
    "HostedError",
    "HostedProvider",
    "HostedReply",
    "HostedRequest",
    "InvalidRequest",
    "JobFailed",
    "ModelPrice",
    "Network",
    "NoCapacity",
    "NotFound",
    "OpenAIProvider",
    "Payer",
    "PaymentDeclined",
    "PaymentError",
    "PaymentRejected",
    "PaymentRequired",
    "PermissionDenied",
    "Price",
    "PriceTable",
    "RateLimited",
    "ReceiptCheck",
    "ReceiptInvalid",
    "RelayedPayment",
    "Route",
    "Skip",
    "SpendingLimitExceeded",
    "SpendingLimits",
    "SyncComputeRouter",
    "SyncComputeStream",
    "WorkerRef",
    "llm_spec",
    "providers_from_env",
    "task_spec",
    "types",
    "verify_receipt",
]
