"""`sidecar run` on uvloop, to measure what uvloop would give without changing the sidecar:
sets uvloop's event-loop policy, then hands the arguments to sidecar.cli.main.

    python -m bench.uvloop_sidecar run --redis ... --upstream ... --listen ... --admin ... --policies ...
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from sidecar.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(sys.argv[1:]))
