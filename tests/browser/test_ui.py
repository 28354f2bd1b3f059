"""The inspection page (SPEC §10) in headless Chromium against a real `sidecar run` on real Redis:
the token entered once (kept in sessionStorage, never in a URL or cookie), customers searched
and paged, a customer's numbers changing after traffic, its history chart and notifications, the
outbox's dead letters redriven after a confirmation, and hostile text shown as text.

With SIDECAR_UI_SCREENSHOTS=<directory> each main view is saved there (docs/ holds them).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.browser.conftest import ACME_KEY, HOSTILE, TOKEN, Sidecar

WAIT_SECONDS = 20.0


def wait_for(check: Callable[[], Any], what: str, seconds: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as error:  # an element not there yet, or stale after a redraw
            last = error
        time.sleep(0.1)
    raise AssertionError(f"waited {seconds}s for {what}; last: {last!r}")


def css(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def text(browser: Any, selector: str) -> str:
    return " ".join(element.text for element in css(browser, selector))


def visible(browser: Any, selector: str) -> bool:
    found = css(browser, selector)
    return bool(found) and found[0].is_displayed()


def screenshot(browser: Any, name: str) -> None:
    directory = os.environ.get("SIDECAR_UI_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(directory) / f"ui-{name}.png"))


def enter_token(browser: Any, sidecar: Sidecar, token: str = TOKEN) -> None:
    browser.get(f"{sidecar.admin}/ui/")
    wait_for(lambda: visible(browser, "#login"), "the token form")
    css(browser, "#token")[0].send_keys(token)
    css(browser, "#token-form button")[0].click()


def test_the_page_is_served_with_a_strict_policy_and_fetches_nothing_from_elsewhere(sidecar: Sidecar) -> None:
    with urllib.request.urlopen(f"{sidecar.admin}/ui/", timeout=5) as response:
        policy = response.headers["Content-Security-Policy"]
        html = response.read().decode()
    assert (
        "default-src 'none'" in policy
        and "script-src 'self'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert "unsafe-inline" not in policy and "http" not in html.replace("http://www.w3.org", "")
    status, _ = sidecar.call("GET", "/admin/billing/outbox", token=None)
    assert status == 401  # the data behind the page is the guarded admin API


def test_token_search_customer_traffic_history_notifications_and_outbox(
    browser: Any, sidecar: Sidecar
) -> None:
    for n in range(25):
        plan = "gold" if n % 5 == 0 else "p"
        assert sidecar.call("PUT", f"/admin/customers/cust-{n:02}", {"plan": plan, "api_keys": []})[0] in (
            200,
            201,
        )

    enter_token(browser, sidecar, "not-the-token")
    wait_for(lambda: "refused" in text(browser, "#status") and visible(browser, "#login"), "the refusal")
    css(browser, "#token")[0].send_keys(TOKEN)
    css(browser, "#token-form button")[0].click()
    wait_for(lambda: len(css(browser, "#customer-table tbody a")) == 20, "the first page of customers")
    assert browser.execute_script("return sessionStorage.getItem('quota-sidecar.admin-token')") == TOKEN
    assert TOKEN not in browser.current_url and browser.execute_script("return document.cookie") == ""
    css(browser, "#next-page")[0].click()
    wait_for(
        lambda: [a.text for a in css(browser, "#customer-table tbody a")][-1] == "cust-24", "the second page"
    )
    screenshot(browser, "customers")

    css(browser, "#prefix")[0].send_keys("cust-1")
    css(browser, "#search-form button")[0].click()
    wait_for(lambda: len(css(browser, "#customer-table tbody a")) == 10, "the prefix search")
    css(browser, "#prefix")[0].clear()
    css(browser, "#plan")[0].send_keys("gold")
    css(browser, "#search-form button")[0].click()
    wait_for(
        lambda: (
            [a.text for a in css(browser, "#customer-table tbody a")]
            == [f"cust-{n:02}" for n in range(0, 25, 5)]
        ),
        "the plan search",
    )

    browser.get(f"{sidecar.admin}/ui/#/customer/acme")  # the token stays for the tab
    wait_for(
        lambda: "0 / 10 used" in text(browser, "[data-limit='requests-month'] .numbers"), "acme's limits"
    )
    assert [sidecar.search() for _ in range(9)] == [200] * 9
    css(browser, "#refresh")[0].click()
    wait_for(
        lambda: "9 / 10 used" in text(browser, "[data-limit='requests-month'] .numbers"),
        "the numbers after traffic",
    )
    wait_for(lambda: css(browser, "#notifications li[data-threshold='80']"), "the 80% notification")
    wait_for(lambda: len(sidecar.hooks.bodies) >= 1, "the notification delivered")

    def charted() -> bool:
        css(browser, "#refresh")[0].click()
        return bool(css(browser, "#chart svg[data-meter='requests'] rect.column"))

    wait_for(charted, "the usage chart, once the 1-second windows are closed")

    def history_total() -> int | None:
        """The history table's requests; None while a refresh re-renders it under our feet."""
        from selenium.common.exceptions import StaleElementReferenceException

        try:
            return sum(int(cell.text) for cell in css(browser, "#history-table tbody td:nth-child(4)"))
        except StaleElementReferenceException:
            return None

    wait_for(lambda: history_total() == 9, "the history table's 9 requests")
    screenshot(browser, "customer")

    browser.get(f"{sidecar.admin}/ui/#/outbox")

    def dead_letters() -> list[Any]:
        browser.refresh()
        return wait_for(lambda: css(browser, "#billing-dead tbody tr"), "the outbox view", seconds=1.0)

    wait_for(dead_letters, "billing's dead letters (it answers 422)")
    reasons = text(browser, "#billing-dead .reason")
    assert HOSTILE in reasons and not css(browser, "#billing-dead img, #billing-dead script")
    assert browser.execute_script("return window.__pwned") is None
    screenshot(browser, "outbox")
    sidecar.billing.refusing = False
    css(browser, ".redrive[data-kind='billing'] .redrive-ask")[0].click()
    wait_for(lambda: visible(browser, ".redrive[data-kind='billing'] .redrive-confirm"), "the confirmation")
    assert "Redrive" in text(browser, ".redrive[data-kind='billing'] .redrive-question")
    css(browser, ".redrive[data-kind='billing'] .redrive-yes")[0].click()
    wait_for(
        lambda: "Redriven" in text(browser, ".redrive[data-kind='billing'] .redrive-result"), "the redrive"
    )
    wait_for(lambda: sum(len(b["summaries"]) for b in sidecar.billing.bodies) >= 1, "billing to get them")

    def drained() -> bool:
        browser.refresh()
        return bool(css(browser, "#billing-dead tbody")) and not css(browser, "#billing-dead tbody tr")

    wait_for(drained, "no dead letters left")


def test_a_hostile_customer_id_in_a_link_is_shown_as_text(browser: Any, sidecar: Sidecar) -> None:
    hostile_id = "<img src=x onerror=window.__pwned=1>"
    enter_token(browser, sidecar)
    wait_for(lambda: css(browser, "#customer-table tbody tr"), "the customers view")
    browser.get(f"{sidecar.admin}/ui/#/customer/" + urllib.request.quote(hostile_id, safe=""))
    wait_for(lambda: text(browser, "#customer-title") == hostile_id, "the id as the title")
    wait_for(lambda: "no customer" in text(browser, "#status"), "the 404 said")
    assert not css(browser, "main img") and browser.execute_script("return window.__pwned") is None
    css(browser, "#forget-token")[0].click()
    wait_for(lambda: visible(browser, "#login"), "the token form again")
    assert browser.execute_script("return sessionStorage.getItem('quota-sidecar.admin-token')") is None
    assert ACME_KEY not in browser.page_source
