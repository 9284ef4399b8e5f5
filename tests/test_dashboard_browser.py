"""The operator dashboard in a real headless browser: the system's Chromium (`make setup`
installs it with the system package manager), driven by Playwright. The page opens live
(server-sent events), a job submitted meanwhile appears and completes on it without a
reload, and nothing on the page breaks its Content-Security-Policy. The screenshot is a
test artifact: $DISPATCH_TEST_ARTIFACTS/dashboard.png when that is set (the README's
image is made so: DISPATCH_TEST_ARTIFACTS=docs), else in the test's tmp_path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec


def chromium() -> str:
    path = os.environ.get("DISPATCH_CHROMIUM") or shutil.which("chromium") or ""
    if not path:
        pytest.fail(
            "no system Chromium for the dashboard's browser test: `make setup` installs it "
            "(apt-get install chromium), or set DISPATCH_CHROMIUM to a Chromium binary"
        )
    return path


def artifact(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DISPATCH_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "dashboard.png"


async def test_a_job_appears_and_completes_live_in_a_real_browser(
    cluster: Cluster, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    obs = cluster.coord.observability
    assert obs is not None and obs.dashboard is not None
    for _ in range(3):
        await cluster.worker("seeker")
    c = cluster.client()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            problems: list[str] = []
            page = await browser.new_page(viewport={"width": 1440, "height": 860})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            def console(msg: Any) -> None:
                if msg.type == "error":  # e.g. a Content-Security-Policy violation
                    problems.append(f"console: {msg.text}")

            page.on("console", console)
            await page.goto(obs.dashboard.login_url)
            await page.locator("#live.on").wait_for(timeout=10_000)  # live over SSE
            assert "token" not in page.url  # the token leaves the address bar at once
            assert await page.locator("#workers tbody tr[data-worker-id]").count() == 3

            job = await c.submit(task_spec("sleep", b'{"ms": 400}'))
            row = page.locator(f'#jobs tr[data-job-id="{job.job_id}"]')
            await row.wait_for(timeout=10_000)  # it appears while it waits or runs
            assert await row.get_attribute("data-state") in ("queued", "offered", "running")
            done = page.locator(f'#jobs tr[data-job-id="{job.job_id}"][data-state="completed"]')
            await done.wait_for(timeout=15_000)  # and completes, no reload
            assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
            assert "sleep" in await done.inner_text()
            await page.locator("#flow-completed .n", has_text="1").wait_for(timeout=10_000)

            # a few more jobs make the picture (one cancelled while it runs)
            for name, data in [("echo", b'"hello"'), ("word_count", b'"to be or not to be"'),
                               ("sha256", b"dispatch")]:  # fmt: skip
                await c.wait((await c.submit(task_spec(name, data))).job_id)
            slow = await c.submit(task_spec("sleep", b'{"ms": 5000}'))
            await page.locator(f'tr[data-job-id="{slow.job_id}"][data-state="running"]').wait_for(
                timeout=10_000
            )
            await c.cancel(slow.job_id)
            await page.locator(f'tr[data-job-id="{slow.job_id}"][data-state="cancelled"]').wait_for(
                timeout=10_000
            )
            await page.locator("#flow-completed .n", has_text="4").wait_for(timeout=10_000)
            shot = artifact(tmp_path)
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"dashboard screenshot: {shot}")

            # without the token: the sign-in form, which refuses a wrong token
            other = await browser.new_page()
            await other.goto(obs.dashboard.url)
            await other.locator("#login.show").wait_for(timeout=10_000)
            await other.fill("#token", "not-the-token")
            await other.click("#login button")
            await other.locator("#login-error", has_text="refused").wait_for(timeout=10_000)
            await other.fill("#token", obs.dashboard.token)
            await other.click("#login button")
            await other.locator("#live.on").wait_for(timeout=10_000)
            rows = other.locator("#jobs tr[data-job-id]")
            assert await rows.count() == 5
            # the wrong token's 401 is the only error either page logged
            assert [p for p in problems if "401" not in p] == [], problems
        finally:
            await browser.close()
