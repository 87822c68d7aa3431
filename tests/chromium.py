"""Headless Chromium (Debian's chromium + chromium-driver) through Selenium, for browser tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

__all__ = ["ThirdPartyCookies", "chromium_available", "headless_chromium"]

ThirdPartyCookies = Literal["default", "allow", "block"]


def chromium_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@contextmanager
def headless_chromium(
    *,
    ca_bundle: str | None = None,
    third_party_cookies: ThirdPartyCookies = "default",
    extra_flags: tuple[str, ...] = (),
) -> Iterator[Any]:
    """A Selenium Chrome driver on /usr/bin/chromium with no background network traffic.

    The sandbox's Entra stand-in uses a local CA Chromium does not know; the tests only send
    the browser to loopback, so certificate errors are ignored there (``ca_bundle`` unused).
    ``third_party_cookies``: Chromium's default for a new profile (Chromium 156 blocks them),
    or the profile set as the "Allow"/"Block third-party cookies" setting does.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vv-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",
        "--window-size=1200,900",
        f"--user-data-dir={profile}",
        *extra_flags,  # e.g. fake camera and microphone for the device check
    ):
        options.add_argument(flag)
    if third_party_cookies != "default":
        block = third_party_cookies == "block"
        options.add_experimental_option(
            "prefs",
            {
                "profile.cookie_controls_mode": int(block),
                "profile.block_third_party_cookies": block,
            },
        )
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
