"""ERC-8004 reputation on EVM chains: feedback posted from the coordinator's account
(EvmFeedbackPoster, exactly once per entry) and the feedback of trusted reviewers read back
(EvmReputationReader)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any

from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import Contract
from web3.exceptions import (
    ContractLogicError,
    TimeExhausted,
    Web3RPCError,
)

from dispatchnet.chains.deployments import ChainConfigError
from dispatchnet.chains.evm.node import (
    TRANSIENT,
    EvmChain,
    _address,
    _brief,
    _hex,
    load_abi,
    shared_sender,
    web3_for,
)
from dispatchnet.errors import Unavailable
from dispatchnet.reputation.erc8004 import FeedbackPage, FeedbackRecord

log = logging.getLogger("dispatch.chain")


# --- feedback -------------------------------------------------------------------------------


FEEDBACK_LOOKBACK = 10_000  # blocks searched for an entry's earlier transaction
# giveFeedback's gas limit is the node's estimate plus this share (storage costs can move
# between the estimate and the transaction: a first rating of an agent costs more)
FEEDBACK_GAS_MARGIN = 0.25


class FeedbackRejected(RuntimeError):
    """giveFeedback reverts (or would): e.g. the coordinator's account owns the agent, or
    the agent does not exist. The entry is marked "failed" with this reason."""


def reputation_contract(w3: Web3, address: str) -> Contract:
    return w3.eth.contract(
        address=Web3.to_checksum_address(address), abi=load_abi("ReputationRegistry")
    )


class EvmFeedbackPoster:
    """Posts ReputationRegistry.giveFeedback from the coordinator's chain account through the
    shared EvmSender (same lock and nonces as the anchorer). Blocking calls run in a thread.

    Exactly once: before sending, the registry's NewFeedback events from this account for
    the agent are searched for the entry's feedbackURI + feedbackHash; when found (a retry
    after a lost receipt or a crash), that transaction is returned and nothing is sent.
    Gas: each transaction gets the node's estimate plus FEEDBACK_GAS_MARGIN, never more than
    `gas_limit` (the profile's cap; chains like Monad charge for the limit). An estimate
    above the cap, or a transaction that ran out of gas, is not the registry refusing the
    entry: Unavailable (the entry stays pending and is retried). Node trouble: Unavailable.
    A revert of the call itself: FeedbackRejected."""

    def __init__(
        self,
        chain: EvmChain,
        *,
        gas_limit: int,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 60.0,
        poll_seconds: float = 0.1,
    ) -> None:
        if not chain.reputation_registry:
            raise ChainConfigError("[chain] has no reputation_registry address")
        if not chain.account_key:
            raise ChainConfigError("[chain] has no account to send feedback from")
        self.network = chain.network
        self.rpc_url = chain.rpc_url
        self.gas_limit = gas_limit
        self.tx_timeout = tx_timeout
        self.poll_seconds = poll_seconds
        self.sender = shared_sender(chain.rpc_url, chain.network, chain.account_key, rpc_timeout)
        self.contract = reputation_contract(self.sender.w3, chain.reputation_registry)

    @property
    def address(self) -> ChecksumAddress:
        return self.sender.address

    def describe(self) -> str:
        return (
            f"evm: ReputationRegistry {self.contract.address} on {self.network}, from "
            f"{self.address}, gas: estimate +{FEEDBACK_GAS_MARGIN:.0%}, at most {self.gas_limit}"
        )

    async def give(self, entry: Any) -> str:
        """Sends one FeedbackEntry; the transaction hash."""
        return await asyncio.to_thread(self._give_locked, entry)

    def _give_locked(self, entry: Any) -> str:
        with self.sender.lock:
            try:
                return self._give(entry)
            except TRANSIENT as e:
                raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e

    def estimate(self, fn: Any) -> int:
        """The gas to send fn with: the node's estimate plus the margin, capped. Raises
        FeedbackRejected when the call itself reverts, Unavailable when it needs more gas
        than the cap allows (raise [feedback] gas_limit)."""
        try:
            needed = int(fn.estimate_gas({"from": self.address}))
        except ContractLogicError as e:
            raise FeedbackRejected(f"giveFeedback reverts: {_brief(e)}") from e
        if needed > self.gas_limit:
            raise Unavailable(
                f"giveFeedback needs {needed} gas; [feedback] gas_limit is {self.gas_limit}: "
                "raise it (the entry stays pending)"
            )
        return min(self.gas_limit, int(needed * (1 + FEEDBACK_GAS_MARGIN)))

    def _give(self, entry: Any) -> str:
        existing = self._existing(entry)
        if existing:
            return existing
        fn = self.contract.functions.giveFeedback(
            entry.agent_id,
            entry.value,
            entry.value_decimals,
            entry.tag1,
            entry.tag2,
            "",
            entry.feedback_uri,
            entry.feedback_hash,
        )
        gas = self.estimate(fn)
        tx_hash = self.sender.send(fn, gas)
        try:
            receipt = self.sender.w3.eth.wait_for_transaction_receipt(
                HexBytes(tx_hash), timeout=self.tx_timeout, poll_latency=self.poll_seconds
            )
        except TimeExhausted as e:
            raise Unavailable(
                f"feedback transaction {_hex(tx_hash)} not mined within {self.tx_timeout:g}s"
            ) from e
        if receipt["status"] != 1:
            used = int(receipt["gasUsed"])
            if used >= gas:  # out of gas, not a refusal: a reverted send changed nothing
                raise Unavailable(
                    f"feedback transaction {_hex(tx_hash)} ran out of gas ({used} of {gas}); "
                    "retrying with a fresh estimate"
                )
            raise FeedbackRejected(
                f"feedback transaction {_hex(tx_hash)} reverted (gas used {used} of {gas})"
            )
        return _hex(tx_hash)

    def _existing(self, entry: Any) -> str:
        """This account's NewFeedback for the entry within the last FEEDBACK_LOOKBACK
        blocks ("" if none). A node that refuses the log query (range limits on public
        RPCs) skips the check, with a warning: only a retry after a lost receipt could
        then post twice."""
        latest = int(self.sender.w3.eth.block_number)
        try:
            logs = self.contract.events.NewFeedback().get_logs(
                from_block=max(0, latest - FEEDBACK_LOOKBACK),
                to_block=latest,
                argument_filters={"agentId": entry.agent_id, "clientAddress": self.address},
            )
        except Web3RPCError as e:
            log.warning("cannot search earlier feedback (%s); sending without the check", e)
            return ""
        for ev in logs:
            args = ev["args"]
            if (
                args["feedbackURI"] == entry.feedback_uri
                and bytes(args["feedbackHash"]) == entry.feedback_hash
            ):
                return _hex(ev["transactionHash"])
        return ""


# eth_getLogs is asked for at most this many blocks at a time (public nodes cap the range)
LOG_RANGE = 10_000
BLOCK_TIMES_KEPT = 50_000  # block timestamps remembered (blocks never change their time)


class EvmReputationReader:
    """Reads ERC-8004 feedback given by the trusted reviewers (blocking: call it in a
    thread): feedback(agent_id, from_block) -> the NewFeedback / FeedbackRevoked events of
    the agent whose clientAddress is a trusted reviewer, each with its block's timestamp;
    summary(agent_id) -> getSummary's (count, average value) for tag1.

    The reviewers are [reputation] trusted_reviewers plus the coordinator's own chain
    account, each once; the event filter names them (topic clientAddress), so the node
    never returns feedback from anyone else. Logs are asked for LOG_RANGE blocks at a time;
    block timestamps are cached."""

    def __init__(
        self, chain: EvmChain, trusted: list[str], tag1: str, timeout: float = 10.0
    ) -> None:
        if not chain.reputation_registry:
            raise ChainConfigError("[chain] has no reputation_registry address")
        # Each reviewer once: getSummary (the reference implementation's too) counts a
        # reviewer listed twice twice.
        reviewers = list(
            dict.fromkeys(_address(a, "[reputation] trusted_reviewers") for a in trusted)
        )
        if chain.account_key and chain.account_address not in reviewers:
            reviewers.append(chain.account_address)  # the coordinator trusts itself
        if not reviewers:
            raise ChainConfigError("[reputation] has no trusted reviewer")
        self.reviewers = reviewers
        self.tag1 = tag1
        self.network = chain.network
        self.rpc_url = chain.rpc_url
        self.w3 = web3_for(chain.rpc_url, timeout)
        self.contract = reputation_contract(self.w3, chain.reputation_registry)
        self._new = HexBytes(self.contract.events.NewFeedback.topic)
        self._revoked = HexBytes(self.contract.events.FeedbackRevoked.topic)
        self._reviewer_topics = ["0x" + "00" * 12 + a[2:].lower() for a in reviewers]
        self._block_times: OrderedDict[int, float] = OrderedDict()
        self._times_lock = threading.Lock()  # refreshes of several agents run in threads

    def summary(self, agent_id: int) -> tuple[int, float]:
        try:
            count, value, decimals = self.contract.functions.getSummary(
                agent_id, self.reviewers, self.tag1, ""
            ).call()
        except TRANSIENT as e:
            raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e
        return int(count), int(value) / 10 ** int(decimals)

    def feedback(self, agent_id: int, from_block: int) -> FeedbackPage:
        try:
            return self._feedback(agent_id, from_block)
        except TRANSIENT as e:
            raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e

    def _feedback(self, agent_id: int, from_block: int) -> FeedbackPage:
        latest = self.w3.eth.get_block("latest")
        last = int(latest["number"])
        self._remember(last, float(latest["timestamp"]))
        topics: list[Any] = [
            [_hex(self._new), _hex(self._revoked)],
            "0x" + agent_id.to_bytes(32, "big").hex(),
            self._reviewer_topics,
        ]
        records: list[FeedbackRecord] = []
        revoked: list[tuple[str, int]] = []
        start = max(0, from_block)
        while start <= last:
            end = min(last, start + LOG_RANGE - 1)
            logs = self.w3.eth.get_logs(
                {
                    "address": self.contract.address,
                    "fromBlock": start,
                    "toBlock": end,
                    "topics": topics,
                }
            )
            for lg in logs:
                if HexBytes(lg["topics"][0]) == self._revoked:
                    args = self.contract.events.FeedbackRevoked().process_log(lg)["args"]
                    revoked.append((str(args["clientAddress"]), int(args["feedbackIndex"])))
                    continue
                args = self.contract.events.NewFeedback().process_log(lg)["args"]
                block = int(lg["blockNumber"])
                records.append(
                    FeedbackRecord(
                        reviewer=str(args["clientAddress"]),
                        index=int(args["feedbackIndex"]),
                        tag1=str(args["tag1"]),
                        tag2=str(args["tag2"]),
                        value=int(args["value"]) / 10 ** int(args["valueDecimals"]),
                        at=self._block_time(block),
                        block=block,
                    )
                )
            start = end + 1
        return FeedbackPage(records, revoked, last + 1, float(latest["timestamp"]))

    def _remember(self, block: int, at: float) -> None:
        with self._times_lock:
            self._block_times[block] = at
            self._block_times.move_to_end(block)
            while len(self._block_times) > BLOCK_TIMES_KEPT:
                self._block_times.popitem(last=False)

    def _block_time(self, block: int) -> float:
        with self._times_lock:
            at = self._block_times.get(block)
        if at is None:
            at = float(self.w3.eth.get_block(block)["timestamp"])
            self._remember(block, at)
        return at
