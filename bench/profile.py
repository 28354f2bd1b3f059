"""Summarise a py-spy `--format raw` profile (collapsed stacks) of a proxy's event-loop thread:
the share of samples spent waiting in epoll, own time by function and by file, inclusive time of
the hot path, and a per-request cost of named parts, to compare the sidecar with the bare proxy.

py-spy samples wall-clock stacks: a thread that is runnable but not running (preempted by the
upstream that shares its core, for instance) is sampled where it stands, so a frame's samples
count its CPU time plus any time the core was taken from it there.

    python -m bench.profile PROFILE.txt      # prints the Markdown summary
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_IDLE = ("select", "selectors.py")  # the loop is waiting in epoll_wait: nothing to do
_LOOP = ("run_forever", "run_until_complete")
_SEND = "_SelectorSocketTransport.write (asyncio/selector_events.py)"


@dataclass(frozen=True)
class Frame:
    func: str
    file: str

    @property
    def short(self) -> str:
        return f"{self.func} ({short_path(self.file)})"


def short_path(path: str) -> str:
    """site-packages/aiohttp/web_protocol.py → aiohttp/web_protocol.py; stdlib → its module file."""
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "lib/python3" in path:
        return path.split("lib/python3", 1)[1].split("/", 1)[1]
    return path


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "?")
    return Frame(match["func"], match["file"])


def _method(func: str) -> str:
    return func.rsplit(".", 1)[-1]


def parse(raw: str) -> list[tuple[list[str], int]]:
    """(frame names root-first, samples) of the event-loop thread; other threads are dropped."""
    stacks = []
    for line in raw.splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames = [parse_frame(part) for part in body.split(";")]
        if any(_method(f.func) in _LOOP for f in frames):
            stacks.append(([f.short for f in frames], int(count)))
    return stacks


@dataclass
class Summary:
    samples: int
    idle: int
    own: Counter[str]
    own_by_file: Counter[str]
    inclusive: Counter[str]
    busy_stacks: list[tuple[list[str], int]] = field(default_factory=list)

    @property
    def busy(self) -> int:
        return self.samples - self.idle

    def within(self, *names: str, leaf: str | None = None) -> int:
        """Busy samples whose stack holds every one of `names` (and ends in `leaf`, when given)."""
        return sum(
            n
            for frames, n in self.busy_stacks
            if all(name in frames for name in names) and (leaf is None or frames[-1] == leaf)
        )

    def within_any(self, names: Iterable[str]) -> int:
        wanted = set(names)
        return sum(n for frames, n in self.busy_stacks if wanted & set(frames))


_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)")


def summarise_leaves(raw: str, pid: int) -> Summary:
    """Own time only, from a `--nonblocking --threads` profile: its stacks can be torn (read while
    the process runs), so only each sample's top frame is used, of the main thread (tid == pid)."""
    idle = total = 0
    own: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    for line in raw.splitlines():
        body, _, count = line.rpartition(" ")
        parts = body.split(";")
        thread = _THREAD.match(parts[0]) if parts else None
        if not count.isdigit() or thread is None or int(thread["tid"]) != pid or len(parts) < 2:
            continue
        leaf = parse_frame(parts[-1])
        total += int(count)
        if _method(leaf.func) == _IDLE[0] and leaf.file.endswith(_IDLE[1]):
            idle += int(count)
            continue
        own[leaf.short] += int(count)
        by_file[short_path(leaf.file)] += int(count)
    return Summary(total, idle, own, by_file, Counter())


# Frames that sit on a system call: a blocking py-spy (which stops the process for each sample)
# lands on them far more often than a non-blocking one.
SYSCALL_FRAMES = (
    ("send()", "_SelectorSocketTransport.write (asyncio/selector_events.py)"),
    ("getpid() in asyncio.get_running_loop", "timeout (asyncio/timeouts.py)"),
    ("recv()", "_SelectorSocketTransport._read_ready__data_received (asyncio/selector_events.py)"),
)


def bias_table(blocking: Summary, nonblocking: Summary) -> str:
    def pct(summary: Summary, name: str) -> str:
        return f"{100 * summary.own[name] / max(summary.busy, 1):.1f}%"

    lines = [
        "| frame (the system call under it) | own, blocking | own, non-blocking |",
        "|---|---:|---:|",
    ]
    for label, name in SYSCALL_FRAMES:
        lines.append(f"| `{name}` ({label}) | {pct(blocking, name)} | {pct(nonblocking, name)} |")
    return "\n".join(lines)


def summarise(raw: str) -> Summary:
    stacks = parse(raw)
    total = sum(count for _, count in stacks)
    idle = 0
    own: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy: list[tuple[list[str], int]] = []
    for frames, count in stacks:
        leaf = frames[-1]
        func, _, file = leaf.rpartition(" (")
        if _method(func) == _IDLE[0] and file.rstrip(")").endswith(_IDLE[1]):
            idle += count
            continue
        busy.append((frames, count))
        own[leaf] += count
        by_file[file.rstrip(")")] += count
        for name in set(frames):
            inclusive[name] += count
    return Summary(total, idle, own, by_file, inclusive, busy)


# The hot path's frames, for the inclusive table (those absent from a profile are left out).
HOT_PATH = (
    "Application._handle (aiohttp/web_app.py)",
    "handle (sidecar/http/proxy.py)",
    "admit (sidecar/admission/gate.py)",
    "identify (sidecar/admission/identity.py)",
    "meter_request (sidecar/admission/plan.py)",
    "RedisStore.check_and_meter (sidecar/store/redis/store.py)",
    "script_arguments (sidecar/store/redis/store.py)",
    "ScriptBatcher.call (sidecar/store/redis/pipeline.py)",
    "evalsha (sidecar/store/redis/resp.py)",
    "RedisStore._admission (sidecar/store/redis/store.py)",
    "ScriptBatcher._flush (sidecar/store/redis/pipeline.py)",
    "Link.data_received (sidecar/store/redis/link.py)",
    "record_verdict (sidecar/http/proxy.py)",
    "forward (sidecar/http/proxy.py)",
    "upstream_request_headers (sidecar/http/headers.py)",
    "ClientSession._request (aiohttp/client.py)",
    "UpstreamPool.send (sidecar/http/upstream.py)",
    "_answer_back (sidecar/http/proxy.py)",
    "_stream_back (sidecar/http/proxy.py)",
    "ratelimit_headers (sidecar/http/problems.py)",
    "StreamResponse.prepare (aiohttp/web_response.py)",
    "_relay_body (sidecar/http/proxy.py)",
)


# The store batcher's work runs in loop callbacks, outside any request handler's stack.
BATCHER_FRAMES = (
    "ScriptBatcher._flush (sidecar/store/redis/pipeline.py)",
    "Link.data_received (sidecar/store/redis/link.py)",
)


@dataclass(frozen=True)
class Part:
    label: str
    sidecar: tuple[str, ...]  # any of these frames (inclusive)
    bare: tuple[str, ...]
    leaf: str | None = None  # and the stack ends here
    under: tuple[str, ...] = ()  # and holds all of these


PARTS = (
    Part(
        "aiohttp server around the handler (reading sockets, HTTP parsing, the loop, writing)",
        ("",),
        ("",),
    ),
    Part(
        "the batcher in loop callbacks: each turn's pipeline written, the replies read and handed out",
        BATCHER_FRAMES,
        (),
    ),
    Part(
        "the request handler, in all", ("handle (sidecar/http/proxy.py)",), ("handle (bench/bare_proxy.py)",)
    ),
    Part(
        "· admission: route, identity, calendar windows, the EVALSHA call",
        ("admit (sidecar/admission/gate.py)",),
        (),
    ),
    Part(
        "  · of which the store call in the handler (arguments, RESP, queueing, the reply parsed)",
        ("RedisStore.check_and_meter (sidecar/store/redis/store.py)",),
        (),
    ),
    Part(
        "· metrics, RateLimit headers, identity headers",
        (
            "record_verdict (sidecar/http/proxy.py)",
            "Histogram.observe (prometheus_client/metrics.py)",
            "ratelimit_headers (sidecar/http/problems.py)",
            "upstream_request_headers (sidecar/http/headers.py)",
        ),
        (),
    ),
    Part(
        "· the upstream call (sidecar: UpstreamPool.send; bare: ClientSession._request)",
        ("ClientSession._request (aiohttp/client.py)", "UpstreamPool.send (sidecar/http/upstream.py)"),
        ("ClientSession._request (aiohttp/client.py)",),
    ),
    Part(
        "  · of which the send() to the upstream",
        (
            "ClientRequest.send (aiohttp/client_reqrep.py)",
            "UpstreamConnection.request (sidecar/http/upstream_connection.py)",
        ),
        ("ClientRequest.send (aiohttp/client_reqrep.py)",),
        leaf=_SEND,
    ),
    Part(
        "· the response to the client (prepare, body, eof)",
        (
            "StreamResponse.prepare (aiohttp/web_response.py)",
            "Response.write_eof (aiohttp/web_response.py)",
            "_relay_body (sidecar/http/proxy.py)",
        ),
        (
            "StreamResponse.prepare (aiohttp/web_response.py)",
            "StreamResponse.write (aiohttp/web_response.py)",
            "StreamResponse.write_eof (aiohttp/web_response.py)",
        ),
    ),
)


def part_samples(summary: Summary, part: Part, kind: str) -> int | None:
    names = part.sidecar if kind == "sidecar" else part.bare
    if not names:
        return None
    if names == ("",):  # everything outside the handler (and outside the batcher's callbacks)
        handler = "handle (sidecar/http/proxy.py)" if kind == "sidecar" else "handle (bench/bare_proxy.py)"
        return summary.busy - summary.within_any([handler, *BATCHER_FRAMES])
    if part.leaf is not None:
        return sum(summary.within(name, leaf=part.leaf) for name in names)
    return summary.within_any(names)


def comparison(profiles: dict[str, tuple[Summary, int, float]]) -> str:
    """Per-request cost of each part, in µs of wall-clock on the proxy's core, for each profile.

    `profiles` maps kind → (summary, requests served while sampled, sampling rate in Hz)."""
    kinds = [k for k in ("bare", "sidecar") if k in profiles]

    def us(kind: str, samples: int | None) -> str:
        _, requests, rate = profiles[kind]
        if samples is None or not requests:
            return "—"
        return f"{samples / rate / requests * 1e6:.0f}"

    lines = [
        "| part | " + " | ".join(f"{k} µs/req" for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| busy (not waiting in epoll), in all | "
        + " | ".join(us(k, profiles[k][0].busy) for k in kinds)
        + " |",
    ]
    for part in PARTS:
        cells = [us(k, part_samples(profiles[k][0], part, k)) for k in kinds]
        lines.append(f"| {part.label} | " + " | ".join(cells) + " |")
    lines.append(
        "| waiting in epoll (idle) | " + " | ".join(us(k, profiles[k][0].idle) for k in kinds) + " |"
    )
    return "\n".join(lines)


def own_markdown(summary: Summary, *, top: int = 20, how: str = "") -> str:
    busy = max(summary.busy, 1)

    def pct(n: int, of: int = busy) -> str:
        return f"{100 * n / of:.1f}%"

    lines = [
        f"Samples of the event-loop thread{how}: {summary.samples}; waiting in epoll (idle): "
        f"{summary.idle} ({pct(summary.idle, max(summary.samples, 1))}); busy: {summary.busy}. "
        "Percentages below are of the busy samples.",
        "",
        f"**Own time, top {top} functions** (the frame on top of the stack; C code such as aiohttp's "
        "HTTP parser and the socket calls is charged to the Python frame that called it):",
        "",
        "| own | function (file) |",
        "|---:|---|",
    ]
    lines += [f"| {pct(n)} | `{name}` |" for name, n in summary.own.most_common(top)]
    packages: Counter[str] = Counter()
    for file, n in summary.own_by_file.items():
        packages[package(file)] += n
    lines += ["", "**Own time by package:**", "", "| own | package |", "|---:|---|"]
    lines += [f"| {pct(n)} | {name} |" for name, n in packages.most_common()]
    lines += ["", f"**Own time by file, top {top}:**", "", "| own | file |", "|---:|---|"]
    lines += [f"| {pct(n)} | `{name}` |" for name, n in summary.own_by_file.most_common(top)]
    return "\n".join(lines)


def package(file: str) -> str:
    """aiohttp/web_protocol.py → aiohttp; a top-level stdlib module → the standard library."""
    if file == "<string>":
        return "generated `__init__` of dataclasses (`<string>`)"
    head, _, rest = file.partition("/")
    if head == "sidecar" and rest.startswith("store/"):
        return "sidecar (store)"
    if rest:
        return f"`{head}`"
    return "standard library, other (selectors, enum, ...)"


def inclusive_markdown(summary: Summary) -> str:
    busy = max(summary.busy, 1)
    lines = [
        "**Inclusive time of the hot path** (blocking py-spy: the function and everything it called):",
        "",
        "| inclusive | function (file) |",
        "|---:|---|",
    ]
    lines += [
        f"| {100 * summary.inclusive[name] / busy:.1f}% | `{name}` |"
        for name in HOT_PATH
        if summary.inclusive[name]
    ]
    return "\n".join(lines)


def main() -> None:
    summary = summarise(Path(sys.argv[1]).read_text())
    print(own_markdown(summary) + "\n\n" + inclusive_markdown(summary))


if __name__ == "__main__":
    main()
