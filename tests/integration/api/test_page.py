"""The page at / in a real browser: Debian's chromium, headless, driven by playwright. A reader
types a question, sees it wait, then the answer with its numbered citations; clicks a citation
and the feedback control. The model's text is shown as text, never as HTML."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from docsrag.tasks.core.settings import load_settings
from docsrag.testing.llm_emulator import Emulator

from tests.support.api_server import start_api
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
# The README's picture is refreshed with UPDATE_SCREENSHOTS=1; otherwise the test's own folder gets it.
SCREENSHOT = ROOT / "docs" / "api-page.png"
ANSWER = "Milvus keeps data in object storage <b>MinIO or S3</b> [1], with the log in a message queue [2]."


@pytest.fixture(scope="module")
def api(faq_index, tmp_path_factory):
    emulator = Emulator().start()
    emulator.answer_text = ANSWER
    env = {"HOME": str(faq_index.home), "LLM_BASE_URL": emulator.url,
           "QUEUE_URL": f"sqlite:///{tmp_path_factory.mktemp('page') / 'questions.db'}"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(f"DOCSRAG_{name}", value)
        running = start_api(load_settings(), answer_here=True)  # `docsrag api --answer`: it answers its queue
        yield running
        running.stop()
    emulator.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install -y chromium (make test does it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_a_reader_asks_sees_the_cited_answer_and_gives_feedback(api, browser, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 760})
    violations = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security Policy" in message.text
            else None)
    response = page.goto(api.url + "/")
    assert "script-src 'sha256-" in response.headers["content-security-policy"]
    page.fill("#question", "Where does Milvus store data?")
    page.click("#submit")
    page.wait_for_selector("#sources li", timeout=30_000)

    answer = page.locator("#answer")
    assert answer.inner_text() == ANSWER, "the model's text, as text"
    assert answer.locator("b").count() == 0, "no HTML from the model reaches the page"
    sources = page.locator("#sources li")
    assert sources.count() >= 2
    first = sources.nth(0).inner_text()
    assert first.startswith("en/faq/") and " — " in first and first.endswith("(docs 2.4.x)")
    assert "milvus_docs" not in sources.all_inner_texts()[1], "versions, never collection names"
    link = sources.nth(0).locator("a")
    assert link.get_attribute("href").startswith("https://milvus.io/docs/v2.4.x/"), "a citation links to its page"
    assert link.get_attribute("rel") == "noopener noreferrer"
    citations = page.locator("#answer a.cite")
    assert [citations.nth(i).inner_text() for i in range(citations.count())] == ["[1]", "[2]"]

    citations.nth(1).click()
    assert sources.nth(1).get_attribute("class") == "chosen" and not sources.nth(0).get_attribute("class")
    picture = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(picture), full_page=True)
    assert picture.stat().st_size > 10_000

    page.click("#not-helpful")
    page.wait_for_selector("#thanks", state="visible")
    assert api.service.stats().feedback.not_helpful == 1
    assert violations == [], "the page's own script runs under its policy"
    page.close()


def test_a_script_injected_into_the_page_does_not_run(api, browser):
    page = browser.new_page()
    page.goto(api.url + "/")
    # What escaping would let through if it failed: markup with a handler, inserted as HTML.
    page.evaluate("document.getElementById('answer').innerHTML = "
                  "'<img src=x onerror=\"document.title=\\'owned\\'\">'")
    page.wait_for_timeout(300)
    assert page.title() == "Ask the docs", "the policy blocks inline handlers"
    page.close()


def test_a_refused_question_says_why(api, browser):
    page = browser.new_page()
    page.goto(api.url + "/")
    page.evaluate("document.getElementById('question').removeAttribute('maxlength')")
    page.fill("#question", "x" * 2500)
    page.click("#submit")
    # expect() polls from Playwright's own script: a string predicate would be an eval the page's
    # Content-Security-Policy refuses.
    expect(page.locator("#status")).to_have_text(re.compile(r"^Error.*at most 2000 characters"))
    page.close()


def test_only_a_web_address_becomes_a_link(api, browser):
    page = browser.new_page()
    page.goto(api.url + "/")
    page.evaluate("""showAnswer({answer: "x [1] [2]", version: null, sources: [
        {n: 1, doc_path: "a.md", heading: "A", version: "2.4.x", url: "javascript:document.title='owned'"},
        {n: 2, doc_path: "b.md", heading: "B", version: "2.4.x", url: "https://milvus.io/docs/v2.4.x/b.md#B"}]})""")
    items = page.locator("#sources li")
    assert items.nth(0).locator("a").count() == 0 and items.nth(0).inner_text() == "a.md — A (docs 2.4.x)"
    assert items.nth(1).locator("a").get_attribute("href") == "https://milvus.io/docs/v2.4.x/b.md#B"
    page.close()
