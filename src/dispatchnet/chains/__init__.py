"""Chain adapters, one package per chain kind (evm/, and the kind "none" in nochain.py),
chosen by the profile's [chain] kind through registry.py; deployments.py is shared."""
