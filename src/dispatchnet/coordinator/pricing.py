"""Prices come from the profile's pricing table, per resolved policy and job type."""

from __future__ import annotations

from dispatchnet.coordinator.models import JobType, Policy
from dispatchnet.profiles import PricingConfig


def resolve_policy(job_type: JobType, policy: Policy) -> Policy:
    """AUTO runs LLM jobs as FAST and TASK jobs as CHEAP (as the seed did)."""
    if policy is Policy.AUTO:
        return Policy.FAST if job_type is JobType.LLM else Policy.CHEAP
    return policy


def price_micros(pricing: PricingConfig, job_type: JobType, policy: Policy) -> int:
    policy = resolve_policy(job_type, policy)
    speed = "fast" if policy is Policy.FAST else "cheap"
    kind = "llm" if job_type is JobType.LLM else "task"
    return int(getattr(pricing, f"{speed}_{kind}"))
