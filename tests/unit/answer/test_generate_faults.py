"""The generation client against an untrusted server (the emulator over HTTP, no index needed):
what is refused as a misconfigured server, what is bounded, and the health probe."""

import asyncio
import time

import pytest

from docsrag.tasks.answer.generate import BadResponse, Generator, RequestDeadline
from docsrag.tasks.core.records import Source
from docsrag.tasks.core.settings import Settings
from docsrag.testing.llm_emulator import Emulator

SOURCES = [Source(1, "en/faq/a.md", "Storage", 0.5, "Milvus stores data in object storage.")]


def ask(settings: Settings, call):
    async def run():
        generator = Generator(settings)
        try:
            return await call(generator)
        finally:
            await generator.close()

    return asyncio.run(run())


def settings_for(llm: Emulator, **values) -> Settings:
    return Settings(llm_base_url=llm.url, llm_max_retries=0, **values)


def test_a_response_over_the_byte_cap_is_refused_as_a_misconfigured_server(llm):
    llm.answer_text = "Object storage [1]. " + "x" * 5_000
    with pytest.raises(BadResponse, match="response of 5,4[0-9][0-9] bytes, over the cap of 2,048"):
        ask(settings_for(llm, llm_max_response_bytes=2048), lambda g: g.answer("q?", SOURCES))


@pytest.mark.parametrize("fault, message", [("html", "did not answer with a chat completion: '<!DOCTYPE html>"),
                                            ("empty", "without choices")])
def test_a_reply_that_is_not_a_chat_completion_is_bad_response(llm, fault, message):
    llm.always = fault
    with pytest.raises(BadResponse, match=message):
        ask(settings_for(llm), lambda g: g.answer("q?", SOURCES))


def test_a_trickling_answer_is_cut_at_the_request_deadline(llm):
    llm.always, llm.trickle_s = "trickle", 0.05  # ~40 s for the whole body, each byte well within a read timeout
    started = time.monotonic()
    with pytest.raises(RequestDeadline):
        ask(settings_for(llm, llm_deadline_s=1.0), lambda g: g.answer("q?", SOURCES))
    assert time.monotonic() - started < 3


def test_usage_and_citations_from_the_server_are_parsed_defensively(llm):
    llm.fault = lambda question: "bad_usage"
    llm.answer_text = "Object storage [1] [" + "9" * 5_000 + "] [2]."
    generated = ask(settings_for(llm), lambda g: g.answer("q?", SOURCES))
    assert generated.answer == "Object storage [1]  ." and generated.cited == [1]
    assert generated.usage.prompt_tokens > 0 and generated.usage.completion_tokens == 20


def test_the_probe_tells_a_server_that_answers_from_one_that_does_not(llm):
    llm.fault = lambda question: "poison"  # every question gets HTTP 500; the probe is answered
    assert ask(settings_for(llm), lambda g: g.probe()) is None
    assert llm.probes == 1 and llm.requests == []
    llm.stop()
    assert "APIConnectionError" in ask(settings_for(llm), lambda g: g.probe())
