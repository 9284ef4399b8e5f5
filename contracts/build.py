"""Compiles contracts/src/*.sol with solc-js (standard JSON, viaIR) into contracts/artifacts/.

Each top-level source file `src/<Name>.sol` yields `artifacts/<Name>.json` =
{abi, bytecode, contractName, deployedBytecode, solcVersion, sourceSha256}, written with
sorted keys and fixed formatting so that a rebuild is byte-identical.

    python contracts/build.py            # (re)write contracts/artifacts/
    python contracts/build.py --check    # rebuild in a temp dir; exit 1 if anything differs
    python contracts/build.py --out DIR  # write the artifacts somewhere else

The compiler is the `solc` npm package pinned in package.json (run `npm install` first).
Imports are resolved here, not by solc: relative imports against the importing file, any
other import (e.g. `@openzeppelin/contracts/...`) under node_modules/. All sources are
passed inline, so the compiler never reads the file system and the output does not
depend on where the repository lives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONTRACTS = Path(__file__).resolve().parent
ROOT = CONTRACTS.parent
SRC = CONTRACTS / "src"
ARTIFACTS = CONTRACTS / "artifacts"
NODE_MODULES = ROOT / "node_modules"
SOLCJS = NODE_MODULES / "solc" / "solc.js"

# Fixed compiler settings. evmVersion is pinned (not the compiler's default) so that the
# bytecode runs on every chain we target; bytecodeHash "none" keeps the metadata hash
# (which covers comments and file names) out of the bytecode.
SETTINGS: dict[str, Any] = {
    "viaIR": True,
    "optimizer": {"enabled": True, "runs": 200},
    "evmVersion": "cancun",
    "metadata": {"bytecodeHash": "none"},
}
OUTPUTS = ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]

_IMPORT = re.compile(r"""^\s*import\s+(?:[^;]*?\s+from\s+)?["']([^"']+)["']\s*;""", re.MULTILINE)


def _resolve(unit: str, path: str) -> str:
    if path.startswith("."):
        return posixpath.normpath(posixpath.join(posixpath.dirname(unit), path))
    return path


def _read_unit(unit: str) -> str:
    """Source unit names are `src/...` for our files, package paths for node_modules."""
    base = CONTRACTS if unit.startswith("src/") else NODE_MODULES
    file = base / unit
    if not file.is_file():
        raise SystemExit(f"build: cannot find {unit} (looked for {file}; run `npm install`?)")
    return file.read_text(encoding="utf-8")


def collect_sources(mains: list[str]) -> dict[str, str]:
    sources: dict[str, str] = {}
    todo = list(mains)
    while todo:
        unit = todo.pop()
        if unit in sources:
            continue
        text = _read_unit(unit)
        sources[unit] = text
        todo.extend(_resolve(unit, p) for p in _IMPORT.findall(text))
    return dict(sorted(sources.items()))


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("build: node is not on PATH")
    return node


def solc_version() -> str:
    out = subprocess.run(
        [_node(), str(SOLCJS), "--version"], check=True, capture_output=True, text=True
    ).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.startswith(">>>")]
    return lines[-1]


def compile_standard_json(standard_input: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Runs `solcjs --standard-json`; output goes to a file (a pipe truncates at 64 KiB)."""
    in_path, out_path = workdir / "input.json", workdir / "output.json"
    in_path.write_text(json.dumps(standard_input), encoding="utf-8")
    with in_path.open("rb") as stdin, out_path.open("wb") as stdout:
        subprocess.run(
            [_node(), str(SOLCJS), "--standard-json"], stdin=stdin, stdout=stdout, check=True
        )
    text = out_path.read_text(encoding="utf-8")
    # solcjs may print lines (">>> ...") before the JSON: skip to the first line with "{".
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("{")), None)
    if start is None:
        raise SystemExit(f"build: no JSON in the compiler output:\n{text[:2000]}")
    result: dict[str, Any] = json.loads("".join(lines[start:]))
    return result


def build(out_dir: Path) -> list[Path]:
    mains = sorted(f"src/{p.name}" for p in SRC.glob("*.sol"))
    if not mains:
        raise SystemExit(f"build: no .sol files in {SRC}")
    sources = collect_sources(mains)
    selection = {unit: {Path(unit).stem: OUTPUTS} for unit in mains}
    standard_input = {
        "language": "Solidity",
        "sources": {unit: {"content": text} for unit, text in sources.items()},
        "settings": {**SETTINGS, "outputSelection": selection},
    }
    with tempfile.TemporaryDirectory(prefix="solc-") as tmp:
        result = compile_standard_json(standard_input, Path(tmp))

    problems = result.get("errors", [])
    for p in problems:
        print(p.get("formattedMessage", p.get("message")), file=sys.stderr)
    if any(p.get("severity") == "error" for p in problems):
        raise SystemExit("build: compilation failed")

    version = solc_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in mains:
        name = Path(unit).stem
        compiled = result["contracts"][unit][name]
        artifact = {
            "contractName": name,
            "abi": compiled["abi"],
            "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
            "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
            "solcVersion": version,
            "sourceSha256": hashlib.sha256(sources[unit].encode("utf-8")).hexdigest(),
        }
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(artifact, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


def check() -> int:
    with tempfile.TemporaryDirectory(prefix="artifacts-") as tmp:
        fresh = {p.name: p.read_bytes() for p in build(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in ARTIFACTS.glob("*.json")}
    stale = sorted(n for n in fresh if committed.get(n) != fresh[n])
    extra = sorted(set(committed) - set(fresh))
    for n in stale:
        print(f"stale: contracts/artifacts/{n} (run make contracts)")
    for n in extra:
        print(f"artifact with no source: contracts/artifacts/{n}")
    if stale or extra:
        return 1
    print("contracts/artifacts/ is up to date")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if artifacts/ is stale")
    ap.add_argument("--out", type=Path, default=ARTIFACTS, help="output directory")
    args = ap.parse_args()
    if args.check:
        return check()
    for p in build(args.out):
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
