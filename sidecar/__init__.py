"""quota-sidecar: entitlement and quota enforcement beside a usage-priced API."""

__version__ = "0.1.0"
