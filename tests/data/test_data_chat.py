import socket
import time

import pytest

from dsd_model.data.chat import ChatClient, ChatError, ChatRejected, MalformedReply, extract_json, map_unordered
from dsd_model.data.curate import judge_messages, parse_verdict
from dsd_model.data.layout import parse_layout
from dsd_model.data.prompts import content_messages, parse_content

LAYOUT = parse_layout("2x2")


def plan_request(caption: str = "a red plush fox") -> list[dict]:
    return content_messages(caption, LAYOUT)


def ask_plan(client: ChatClient, caption: str = "a red plush fox", attempts: int = 3):
    return client.ask_json(plan_request(caption), lambda r: parse_content(r, LAYOUT), attempts)


def test_reply_is_parsed_and_the_request_is_openai_shaped(chat_server, make_settings):
    settings = make_settings(llm_api_key="sk-test")
    with ChatClient(settings.endpoint("llm"), settings) as client:
        subject, panels = ask_plan(client)
    assert subject == "red plush fox"
    assert panels == [f"the red plush fox in scene {i}" for i in range(1, 5)]
    (kind, body), headers = chat_server.requests[0], chat_server.headers[0]
    assert kind == "content"
    assert body["model"] == "test-llm" and body["temperature"] == settings.llm_temperature
    assert body["messages"][0]["role"] == "system" and body["messages"][1]["role"] == "user"
    assert headers["Authorization"] == "Bearer sk-test"


def test_429_waits_for_retry_after_then_succeeds(chat_server, make_settings):
    chat_server.fault(("status", 429, {"Retry-After": "1"}))
    settings = make_settings(backoff_s=0.0)
    with ChatClient(settings.endpoint("llm"), settings) as client:
        start = time.monotonic()
        ask_plan(client)
        elapsed = time.monotonic() - start
    assert chat_server.count() == 2
    assert 1.0 <= elapsed < 3.0


def test_retry_after_is_capped_by_max_backoff(chat_server, make_settings):
    chat_server.fault(("status", 503, {"Retry-After": "3600"}))
    settings = make_settings(max_backoff_s=0.05)
    with ChatClient(settings.endpoint("llm"), settings) as client:
        start = time.monotonic()
        ask_plan(client)
    assert time.monotonic() - start < 1.0


def test_retry_after_as_a_past_http_date_retries_at_once(chat_server, make_settings):
    chat_server.fault(("status", 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    settings = make_settings(backoff_s=5.0)
    with ChatClient(settings.endpoint("llm"), settings) as client:
        start = time.monotonic()
        ask_plan(client)
    assert time.monotonic() - start < 1.0 and chat_server.count() == 2


def test_500_and_timeout_are_retried(chat_server, make_settings):
    chat_server.fault(("status", 500), ("sleep", 1.5))
    settings = make_settings(request_timeout_s=0.3)
    with ChatClient(settings.endpoint("llm"), settings) as client:
        ask_plan(client)
    assert chat_server.count() == 3


def test_retries_exhausted_raise_chat_error_naming_the_url(chat_server, make_settings):
    chat_server.down_after = 0
    settings = make_settings(max_retries=2)
    with ChatClient(settings.endpoint("llm"), settings) as client, pytest.raises(ChatError) as info:
        ask_plan(client)
    assert chat_server.count() == 3
    assert "llm_base_url" in str(info.value) and chat_server.url in str(info.value) and "HTTP 503" in str(info.value)


def test_unreachable_server_names_the_setting(make_settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(vlm_base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with ChatClient(settings.endpoint("vlm"), settings) as client, pytest.raises(ChatError) as info:
        client.complete([{"role": "user", "content": "hello"}])
    assert f"vlm_base_url 'http://127.0.0.1:{port}/v1/chat/completions': is unreachable" in str(info.value)


def test_auth_and_not_found_stop_at_once_and_other_4xx_reject_the_request(chat_server, make_settings):
    settings = make_settings()
    chat_server.fault(("status", 401), ("status", 404), ("status", 400))
    with ChatClient(settings.endpoint("llm"), settings) as client:
        with pytest.raises(ChatError, match="llm_api_key: refused"):
            ask_plan(client)
        with pytest.raises(ChatError, match="llm_base_url / llm_model: .* or model 'test-llm' not found"):
            ask_plan(client)
        with pytest.raises(ChatRejected, match="HTTP 400"):
            ask_plan(client)
    assert chat_server.count() == 3


def test_malformed_replies_are_retried_with_the_problem_named(chat_server, make_settings):
    chat_server.fault(("reply", "I would suggest a fox."), ("reply", '{"subject": "fox", "panels": ["one"]}'))
    settings = make_settings()
    with ChatClient(settings.endpoint("llm"), settings) as client:
        subject, _ = ask_plan(client)
    assert subject == "red plush fox"
    last = chat_server.requests[-1][1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "no JSON object" in last[3]["content"]
    assert "exactly 4 strings" in last[5]["content"]


def test_malformed_until_the_last_attempt_raises_malformed_reply(chat_server, make_settings):
    settings = make_settings()
    with ChatClient(settings.endpoint("llm"), settings) as client, pytest.raises(MalformedReply, match="2 attempt"):
        ask_plan(client, caption="a glitch", attempts=2)
    assert chat_server.count() == 2


def test_replies_are_cached_on_disk(chat_server, make_settings):
    settings = make_settings()
    for _ in range(2):
        with ChatClient(settings.endpoint("llm"), settings) as client:
            ask_plan(client)
    assert chat_server.count() == 1
    uncached = make_settings(cache=False)
    with ChatClient(uncached.endpoint("llm"), uncached) as client:
        ask_plan(client)
    assert chat_server.count() == 2


def test_concurrency_limit_is_respected(chat_server, make_settings):
    settings = make_settings(concurrency=3)
    chat_server.fault(*[("sleep", 0.1)] * 9)
    with ChatClient(settings.endpoint("llm"), settings) as client:
        results = list(map_unordered(lambda c: ask_plan(client, c), [f"a fox {i}" for i in range(9)], 3))
    assert len(results) == 9 and all(future.result()[0].startswith("fox") for _, future in results)
    assert chat_server.max_in_flight == 3


def test_images_are_sent_as_data_urls_and_verdicts_parsed(chat_server, make_settings):
    settings = make_settings()
    with ChatClient(settings.endpoint("vlm"), settings) as client:
        verdict = client.ask_json(
            judge_messages(b"\x89PNG fake", LAYOUT), lambda r: parse_verdict(r, LAYOUT, "vlm:test-vlm"), 1
        )
    assert verdict.subject == "red plush fox" and [p.consistent for p in verdict.panels] == [True] * 4
    assert verdict.panels[2].description == "the red plush fox, view 3, on a wooden table"
    body = chat_server.requests[0][1]
    assert body["model"] == "test-vlm" and body["temperature"] == 0.0
    assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,iVBORyBmYWtl")


@pytest.mark.parametrize(
    "text",
    [
        '{"identical": true}',
        'Reasoning first.\n```json\n{"identical": true}\n```',
        '```\n{"identical": true}\n```\nLet me know if you need more.',
        'Step 1: the {subject} is a fox. {"draft": 1} then the answer: {"identical": true} (final)',
        'Sure: {"identical": true, "reason": "a } inside a string"}',
    ],
)
def test_extract_json_finds_the_last_object(text):
    assert extract_json(text)["identical"] is True


@pytest.mark.parametrize("text", ["no json here", '{"identical": true', "[1, 2, 3]"])
def test_extract_json_refuses_replies_without_an_object(text):
    with pytest.raises(MalformedReply, match="no JSON object"):
        extract_json(text)


def panel(same, description="a fox"):
    return {"description": description, "same_subject": same, "reason": "checked"}


def test_verdict_parsing_is_strict_but_accepts_yes_no():
    def parse(reply):
        return parse_verdict(reply, LAYOUT, "vlm:test")

    verdict = parse({"subject": "fox", "panels": [panel("Yes"), panel(True), panel("no"), panel(False)]})
    assert [p.consistent for p in verdict.panels] == [True, True, False, False]
    with pytest.raises(MalformedReply, match='panel 1: "same_subject" must be true or false'):
        parse({"subject": "fox", "panels": [panel(True), panel("maybe"), panel(True), panel(True)]})
    with pytest.raises(MalformedReply, match="exactly 4 objects"):
        parse({"subject": "fox", "panels": [panel(True)] * 3})
    with pytest.raises(MalformedReply, match='panel 0: "description"'):
        parse({"subject": "fox", "panels": [panel(True, "")] + [panel(True)] * 3})
    with pytest.raises(MalformedReply, match="panel 3 must be an object"):
        parse({"subject": "fox", "panels": [panel(True)] * 3 + ["a fox"]})
    with pytest.raises(MalformedReply, match='"subject"'):
        parse({"panels": [panel(True)] * 4})
