"""The benchmark policy: one count meter, one feature (GET /hello), one plan whose limits never
refuse, and N customers with one API key each (`bench-key-<i>`).

The YAML text is written directly (not through a YAML library), so 100,000 customers take well
under a second to generate.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.admission.identity import hash_key

MONTH_LIMIT = 10**12
SECOND_LIMIT = 10**9

_HEAD = """\
version: 1
meters:
  requests: {{aggregation: count}}
features:
  - {{name: hello, match: {{method: GET, path: /hello}}}}
plans:
  bench:
    features: [hello]
    limits:
      - {{meter: requests, limit: {month}, period: month}}
      - {{meter: requests, limit: {second}, period: second}}
customers:
"""


def api_key(index: int) -> str:
    return f"bench-key-{index}"


def policy_text(customers: int, month_limit: int = MONTH_LIMIT) -> str:
    lines = [_HEAD.format(month=month_limit, second=SECOND_LIMIT)]
    for i in range(customers):
        lines.append(f'  customer-{i}: {{plan: bench, api_keys: ["sha256:{hash_key(api_key(i))}"]}}\n')
    return "".join(lines)


def write_policy(directory: Path, customers: int, month_limit: int = MONTH_LIMIT) -> Path:
    """Write `bench.yaml` for `customers` customers into `directory`, and return its path; a small
    `month_limit` makes every request past it a refusal."""
    path = directory / "bench.yaml"
    path.write_text(policy_text(customers, month_limit))
    return path


def write_keys(directory: Path, customers: int) -> Path:
    """One clear API key per line, in customer order: what the load generators rotate over."""
    path = directory / "keys.txt"
    path.write_text("".join(f"{api_key(i)}\n" for i in range(customers)))
    return path
