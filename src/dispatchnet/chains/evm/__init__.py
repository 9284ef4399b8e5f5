"""The EVM chain kind (web3.py): node and account, anchoring, reputation, identity, x402
payments, contract deployment; `adapter.py` is its ChainAdapter.

Import EVM libraries (web3, eth_account, x402's EVM scheme) after this package. py_ecc,
which eth_account imports (through eth_keyfile), raises the interpreter's recursion limit
to 100000 as a side effect of being imported. With that limit, deeply nested input (for
example json.loads of 100,000 "[") overflows the C stack and kills the process with a
segmentation fault instead of raising RecursionError. Importing this package imports
py_ecc once and puts the limit back, so a coordinator that parses untrusted JSON stays up.
"""

import sys as _sys

_DEFAULT_RECURSION_LIMIT = 1000  # CPython's default

if "py_ecc" in _sys.modules:  # already imported elsewhere: the earlier limit is lost
    _limit = min(_sys.getrecursionlimit(), _DEFAULT_RECURSION_LIMIT)
else:
    _limit = _sys.getrecursionlimit()
    import py_ecc  # noqa: F401  (imported for its side effect, undone below)
_sys.setrecursionlimit(_limit)
