"""Deployment profiles: TOML files that select every behaviour that differs per deployment.

Code never branches on a chain's name; it reads a profile. `--profile NAME` looks for
NAME.toml in $DISPATCH_PROFILE_DIR, then in the project's profiles/ folder; a path to a
.toml file works too.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PROFILE_DIR = Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    max_message_bytes: int = 4 * 1024 * 1024
    sqlite_synchronous: str = "NORMAL"


@dataclass(frozen=True)
class LimitsConfig:
    max_task_input_bytes: int = 1024 * 1024
    max_prompt_chars: int = 32768
    max_llm_tokens: int = 4096
    max_wasm_module_bytes: int = 2 * 1024 * 1024


@dataclass(frozen=True)
class JobsConfig:
    quote_ttl_seconds: int = 300
    max_attempts: int = 3
    offer_lease_seconds: float = 10
    time_limit_seconds: int = 300
    queue_timeout_seconds: float = 600
    sweep_interval_seconds: float = 1.0


@dataclass(frozen=True)
class WorkersConfig:
    heartbeat_interval_seconds: int = 10
    eviction_seconds: float = 30


@dataclass(frozen=True)
class PricingConfig:
    currency: str = "USD"
    fast_llm: int = 10000
    fast_task: int = 3000
    cheap_llm: int = 5000
    cheap_task: int = 1000


@dataclass(frozen=True)
class AuthConfig:
    max_token_ttl_seconds: int = 86400


@dataclass(frozen=True)
class PairingConfig:
    code_ttl_seconds: int = 3600


@dataclass(frozen=True)
class PaymentsConfig:
    enabled: bool = False


@dataclass(frozen=True)
class ReputationConfig:
    source: str = "local"


@dataclass(frozen=True)
class ReceiptsConfig:
    # A batch closes when this many receipts wait, or when the oldest has waited this long.
    batch_size: int = 64
    batch_max_age_seconds: float = 10
    # Where batch roots are anchored: "none" (no chain), or a chain adapter's name.
    anchor: str = "none"


@dataclass(frozen=True)
class Profile:
    name: str = "local"
    description: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)

    def with_overrides(self, **sections: dict[str, Any]) -> Profile:
        """A copy with some fields of some sections replaced (used by tests and the CLI)."""
        changes: dict[str, Any] = {}
        for section, values in sections.items():
            changes[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **changes)


class ProfileError(ValueError):
    """A profile that cannot be found or does not parse."""


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ProfileError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        expected: type[Any] = hints[name]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ProfileError(f"{where}: [{name}] must be a section")
            kwargs[name] = _build(expected, value, f"{where} [{name}]")
        elif type(value) is expected or (expected is float and type(value) is int):
            kwargs[name] = value
        else:
            raise ProfileError(
                f"{where}: {name} must be {expected.__name__}, not {type(value).__name__}"
            )
    return cls(**kwargs)


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" and p.exists():
        return p
    dirs = [Path(d) for d in os.environ.get("DISPATCH_PROFILE_DIR", "").split(os.pathsep) if d]
    for d in [*dirs, PROFILE_DIR]:
        candidate = d / f"{name_or_path}.toml"
        if candidate.exists():
            return candidate
    raise ProfileError(f"no profile named {name_or_path!r} (looked in {PROFILE_DIR.name}/)")


def load_profile(name_or_path: str) -> Profile:
    path = resolve_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path.name}: {e}") from e
    return _build(Profile, data, path.name)
