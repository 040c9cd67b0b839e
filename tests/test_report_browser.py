"""The HTML report in a real browser: headless Chromium (the Debian package), driven over the
DevTools protocol. The page renders without console errors, makes no network request but the
page itself, its per-minute chart has one bar per minute with calls, and a screenshot is taken
into the test's temporary directory.

Skipped, loudly (the skip reason says what to install), where no Chromium is installed;
``.ci/run`` installs the Debian package when it runs as root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bulkoffboard import api, history, reports
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, iso
from tests.conftest import StartEmulator, connection_for

pytestmark = pytest.mark.timeout(60)

#: The whole browser session of one test (start, load, checks, screenshot) must fit in this.
BROWSER_BUDGET_S = 20.0
BROWSERS = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 1280, 1400
HOSTILE = [
    "<img src=https://evil.example/pixel.png onerror=alert(1)>",
    "<script>fetch('https://evil.example/x')</script>",
    "<link rel=stylesheet href=https://evil.example/a.css>",
]


def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found is not None:
            return found
    message = (
        "NO BROWSER: the HTML report is not checked in Chromium. Install the Debian package "
        "'chromium' (apt-get install chromium; .ci/run installs it when run as root)"
    )
    sys.stderr.write(f"\nWARNING: {message}\n")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    """Skip before any work when there is no browser."""
    chromium()


@dataclass
class Page:
    """What the browser saw while it showed one page."""

    url: str
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


class Chromium:
    """Headless Chromium on a DevTools port, and one page (tab) driven over its websocket."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary = binary
        self.profile = profile
        self.process: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader: asyncio.Task[None] | None = None
        self.event_seen = asyncio.Event()

    async def start(self) -> None:
        self.profile.mkdir()
        log = (self.profile.parent / "chromium.log").open("wb")
        with log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                "--headless=new",
                "--no-sandbox",  # as root (CI) Chromium refuses to start without it
                "--disable-gpu",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                # Nothing the page might ask for leaves the machine; the request is still seen.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        port = await self._port()
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.call(f"{domain}.enable")

    async def _port(self) -> int:
        """The DevTools port Chromium chose, from the DevToolsActivePort file it writes."""
        active = self.profile / "DevToolsActivePort"
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                log = (self.profile.parent / "chromium.log").read_text(errors="replace")
                raise RuntimeError(f"chromium exited with {self.process.returncode}: {log}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                text = active.read_text()
                if "\n" in text:
                    return int(text.split("\n", 1)[0])
            await asyncio.sleep(0.05)

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(message.data)
            future = self.waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)
                self.event_seen.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        number = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[number] = future
        message = {"id": number, "method": method, "params": params}
        await self.ws.send_str(orjson.dumps(message).decode())  # DevTools reads text frames
        answer = await future
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _event(self, method: str, since: int) -> None:
        while not any(e["method"] == method for e in self.events[since:]):
            self.event_seen.clear()
            await self.event_seen.wait()

    async def show(self, url: str) -> Page:
        """Load ``url``; what it requested and logged until it had loaded (and a moment after,
        for late console messages)."""
        since = len(self.events)
        await self.call("Page.navigate", url=url)
        await self._event("Page.loadEventFired", since)
        await self.call("Runtime.evaluate", expression="0", awaitPromise=True)  # a round trip
        await asyncio.sleep(0.2)
        page = Page(url)
        for event in self.events[since:]:
            method, params = event["method"], event.get("params", {})
            if method == "Network.requestWillBeSent":
                page.requests.append(params["request"]["url"])
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                page.console.append(f"console.{params['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                page.console.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("warning", "error"):
                entry = params["entry"]
                page.console.append(f"log.{entry['level']}: {entry['text']} {entry.get('url')}")
        return page

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def screenshot(self, path: Path) -> bytes:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.http is not None:
            await self.http.close()
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: its helpers too
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


@contextlib.asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    chrome = Chromium(chromium(), tmp_path / "chromium-profile")
    try:
        async with asyncio.timeout(BROWSER_BUDGET_S):
            await chrome.start()
            yield chrome
    finally:
        await chrome.close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


CHART = """(() => {
  const svg = document.querySelectorAll('svg');
  const box = svg.length ? svg[0].getBoundingClientRect() : {width: 0, height: 0};
  return {
    charts: svg.length,
    bars: svg.length ? svg[0].querySelectorAll('rect.bar, rect.over').length : -1,
    over: svg.length ? svg[0].querySelectorAll('rect.over').length : -1,
    gaps: svg.length ? svg[0].querySelectorAll('rect.gap').length : -1,
    width: box.width,
    height: box.height,
    scripts: document.scripts.length,
    images: document.images.length,
    text: document.body.innerText,
  };
})()"""


async def check_report(journal: Path, tmp_path: Path) -> dict[str, Any]:
    """Render the journal's HTML report, show it in Chromium and check what every report
    page must do; returns the chart's counts for the caller's own checks."""
    page_path = tmp_path / "report.html"
    page_path.write_text(reports.render_file(journal, "html"), encoding="utf-8")
    url = page_path.as_uri()
    timeline = reports.timeline_from_file(journal)

    async with browser(tmp_path) as chrome:
        page = await chrome.show(url)
        chart = await chrome.evaluate(CHART)
        shot = await chrome.screenshot(tmp_path / "report.png")

    assert page.console == [], "the page logged errors or warnings"
    assert page.requests == [url], "the page made a request of its own"
    assert chart["scripts"] == 0 and chart["images"] == 0
    assert chart["charts"] == 2
    assert chart["bars"] == len(timeline.per_minute) > 0, "one bar per minute with calls"
    assert chart["width"] > 0 and chart["height"] > 0, "the chart is drawn"
    assert "Outcomes" in chart["text"] and "Offboard calls" in chart["text"]
    assert (tmp_path / "report.png").read_bytes() == shot
    width, height = png_size(shot)
    assert width >= WIDTH // 2 and height >= HEIGHT // 2, (width, height)
    assert len(shot) > 10_000, "a screenshot of a drawn page, not a blank one"
    return dict(chart)


async def test_the_html_report_of_an_emulator_run_renders_cleanly_in_chromium(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator()
    machines = list(server.emulator.machines)[:40]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([*machines[:20], *HOSTILE, *machines[20:]]) + "\n")
    journal = tmp_path / "run.jsonl"
    await api.run(
        ids,
        journal=journal,
        comment="CHG0042 <b>retire</b> & 'quote'",
        limits=["100/60", "1500/3600"],
        connection=connection_for(server),
        exclude_id=[machines[0]],
    )

    chart = await check_report(journal, tmp_path)

    for value in HOSTILE:
        assert value in chart["text"], "hostile input shows as text"
    assert chart["over"] == 0


def at(epoch: float) -> str:
    return iso(datetime.fromtimestamp(epoch, UTC))


async def test_the_per_minute_chart_has_a_bar_for_every_busy_minute_and_marks_overruns(
    tmp_path: Path,
) -> None:
    """Three busy minutes (one over the limit), a quiet stretch drawn as a gap, two more."""
    start = 29_916_667 * 60.0  # a minute's start, in 2026
    calls = {0: 100, 1: 101, 2: 40, 30: 12, 31: 1}
    journal = tmp_path / "busy.jsonl"
    header = {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": "0.1.0",
        "run_id": "4b0cf2b0-0000-4000-8000-000000000001",
        "created_at": at(start),
        "source": {"kind": "file", "path": str(tmp_path / "ids.txt"), "format": "text"},
        "comment": "busy",
        "limits": [[100, 60.0]],
        "workers": 8,
        "api_url": "https://api.security.microsoft.com",
        "tenant_id": "t",
        "client_id": "c",
    }
    writer = Journal.create(journal, header)
    try:
        writer.append({"type": "session", "at": at(start), "pid": 1, "command": "run"})
        number = itertools.count(1)
        for minute, count in calls.items():
            for call in range(count):
                machine_id = f"{next(number):040x}"
                moment = start + minute * 60 + call * 59 / max(count, 1)
                writer.append(
                    {"type": "attempt", "machine_id": machine_id, "attempt": 1, "at": at(moment)}
                )
    finally:
        writer.close()

    chart = await check_report(journal, tmp_path)

    assert chart["bars"] == 5
    assert chart["over"] == 1
    assert chart["gaps"] == 1


async def test_the_browser_check_sees_console_errors_and_outside_requests(tmp_path: Path) -> None:
    """The harness itself: a page that logs an error and loads an outside image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>bad</p>"
        '<img src="https://evil.example/pixel.png">'
        "<script>console.error('boom')</script></body></html>"
    )

    async with browser(tmp_path) as chrome:
        page = await chrome.show(bad.as_uri())

    assert page.requests[0] == bad.as_uri()
    assert "https://evil.example/pixel.png" in page.requests
    assert any("console.error: boom" in line for line in page.console), page.console


async def test_the_history_html_renders_cleanly_with_a_bar_a_night(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Three nights of real runs against the emulator (the journals' ``created_at`` moved to
    the nights, as a nightly schedule would have written them), one a hostile tenant name:
    the history page has one bar a night and says what each run did."""
    server = await start_emulator()
    machines = list(server.emulator.machines)
    folder = tmp_path / "journals"
    nights = ("2026-11-01", "2026-11-02", "2026-11-04")
    for number, night in enumerate(nights):
        ids = tmp_path / f"ids-{night}.txt"
        ids.write_text("\n".join(machines[number * 10 : number * 10 + 5 + number]) + "\n")
        journal = folder / f"{night}.jsonl"
        journal.parent.mkdir(exist_ok=True)
        await api.run(
            ids,
            journal=journal,
            comment=f"night {night}",
            limits=["100/60", "1500/3600"],
            connection=connection_for(server),
        )
        lines = journal.read_bytes().splitlines(keepends=True)
        head = orjson.loads(lines[0]) | {"created_at": f"{night}T02:00:00.000000Z"}
        if number == 2:
            head["tenant_name"] = HOSTILE[0]
        journal.write_bytes(orjson.dumps(head) + b"\n" + b"".join(lines[1:]))
    page_path = tmp_path / "history.html"
    page_path.write_text(history.report(journal_dir=folder, fmt="html"), encoding="utf-8")
    url = page_path.as_uri()

    async with browser(tmp_path) as chrome:
        page = await chrome.show(url)
        chart = await chrome.evaluate(CHART)
        shot = await chrome.screenshot(tmp_path / "history.png")

    assert page.console == [], "the page logged errors or warnings"
    assert page.requests == [url], "the page made a request of its own"
    assert chart["scripts"] == 0 and chart["images"] == 0
    assert chart["charts"] == 1 and chart["bars"] == len(nights)
    assert chart["width"] > 0 and chart["height"] > 0
    assert "3 runs over 3 nights" in chart["text"] and HOSTILE[0] in chart["text"]
    assert len(shot) > 10_000
