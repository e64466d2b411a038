"""The console for integration tests: a Chromium driven by Selenium (the system's chromedriver), and
a plain HTTP client that signs in the way a browser does, for what a browser cannot be made to do
(a form without its CSRF token, a POST from another origin)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.harness import Service
from tests.integration.operator_helpers import TOKENS

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def chromium() -> WebDriver:
    """Headless Chromium from Debian's packages (scripts/ensure-chromium); never a download."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "Chromium is missing: run scripts/ensure-chromium (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    browser = webdriver.Chrome(options=options, service=DriverService(executable_path=driver))
    browser.set_page_load_timeout(30)
    return browser


def wait_for(browser: WebDriver, predicate: Any, timeout: float = 20) -> Any:
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: predicate())


def text(browser: WebDriver, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def screenshot(browser: WebDriver, path: Path) -> Path:
    """The whole page, not only the window: the window grows to the page's height first."""
    width = browser.get_window_size()["width"]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(max(height + 120, 600), 4000))
    browser.save_screenshot(str(path))
    browser.set_window_size(width, 900)
    return path


def accessible(browser: WebDriver) -> None:
    """What every console page promises: one h1, a label for every field, a title for every picture,
    and no horizontal scrolling of the page itself at the window's width."""
    assert len(browser.find_elements(By.TAG_NAME, "h1")) == 1
    for field in browser.find_elements(By.CSS_SELECTOR, "input:not([type=hidden]), select, textarea"):
        name = field.get_attribute("id")
        assert name and browser.find_elements(By.CSS_SELECTOR, f"label[for='{name}']"), field.get_attribute(
            "name"
        )
    for picture in browser.find_elements(By.CSS_SELECTOR, "svg[role=img]"):
        assert picture.find_elements(By.TAG_NAME, "title")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


class ConsoleClient:
    """Signs in over HTTP as the sign-in page's form does (its pre-session cookie and CSRF token)."""

    def __init__(
        self, service: Service, local_address: str = "127.0.0.1", forwarded_for: str | None = None
    ) -> None:
        self.service = service
        self.http = httpx.Client(
            base_url=service.url,
            transport=httpx.HTTPTransport(local_address=local_address),
            timeout=30,
            follow_redirects=False,
            headers={"X-Forwarded-For": forwarded_for} if forwarded_for else None,
        )
        self.origin = {"Origin": service.url}

    def csrf(self, path: str = "/console/login") -> str:
        found = CSRF.search(self.http.get(path).text)
        assert found is not None, f"no CSRF token on {path}"
        return found.group(1)

    def sign_in(self, operator: str = "alice", token: str | None = None) -> httpx.Response:
        form = {"csrf": self.csrf(), "token": token or TOKENS[operator], "next": "/console/"}
        return self.http.post("/console/login", data=form, headers=self.origin)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, data: dict[str, str], **headers: str) -> httpx.Response:
        return self.http.post(path, data=data, headers={**self.origin, **headers})
