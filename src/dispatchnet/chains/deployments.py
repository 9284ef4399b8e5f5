"""Deployment files, shared by every chain kind: where a profile's `deployment` points
($DISPATCH_HOME/chains/<name>.json, written by `dispatch chain up`, or a path to a .json
file), and the error for chain settings that do not work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dispatchnet import keys

CHAINS_DIR = "chains"  # under $DISPATCH_HOME: <name>.json deployment files


class ChainConfigError(ValueError):
    """The profile's chain settings, or the deployment file they name, do not work."""


class DevChainError(RuntimeError):
    """A local development chain could not be started or stopped."""


def deployment_path(name: str) -> Path:
    """The deployment file a profile's `deployment` names: a path to a .json file, or
    $DISPATCH_HOME/chains/<name>.json."""
    if name.endswith(".json") or os.sep in name:
        return Path(name).expanduser()
    return keys.default_home() / CHAINS_DIR / f"{name}.json"


def read_deployment(name: str) -> dict[str, Any]:
    path = deployment_path(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainConfigError(
            f"no deployment file {path} (run `dispatch chain up` for a local chain)"
        ) from None
    except (OSError, ValueError) as e:
        raise ChainConfigError(f"cannot read deployment file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ChainConfigError(f"{path} is not a deployment file")
    return data


def in_home(path: str) -> Path:
    """A path from a profile: relative paths are under $DISPATCH_HOME."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else keys.default_home() / p
