"""The benchmark's upstream: sidecar.runtime.demo's app (GET /hello answers a small JSON body), served in
its own process until SIGTERM or SIGINT.

    python -m bench.upstream --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

from sidecar.runtime.demo import demo_upstream_app


async def serve(host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner = web.AppRunner(demo_upstream_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        await stopping.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
