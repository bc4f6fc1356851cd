"""nanochat/ui.html in a real headless browser: Debian's Chromium driven by Playwright, against scripts/chat_web.py
serving the micro chat model (the `chat_server` fixture). Screenshots go to the test's tmp dir.

Needs the `chromium` package (`apt-get install chromium`; .ci/run installs it) and the `playwright` dev dependency;
Playwright's own browser download is never used. Without them the tests skip and say why, except where
NANOCHAT_REQUIRE_BROWSER=1 (set by .ci/run), where they fail.
"""

import importlib.util
import json
import os
import shutil

import pytest

from conftest import CHAT_CONTEXT, SlowModel

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 30_000
IDLE = "document.body.dataset.generating === 'false'"

pytestmark = pytest.mark.usefixtures("one_thread")


def _missing():
    """Why the browser test cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright dev dependency is not installed (uv sync)"
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed: apt-get install -y chromium (.ci/run does this)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        # .ci/run sets NANOCHAT_REQUIRE_BROWSER=1: there a missing browser fails the run instead of skipping the test.
        (pytest.fail if os.environ.get("NANOCHAT_REQUIRE_BROWSER") == "1" else pytest.skip)(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, chat_server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(chat_server.url + "/")
    yield page
    context.close()
    assert errors == [], errors


def _send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(IDLE)


def _regenerate(page):
    page.evaluate("window.renders = 0")
    page.locator(".message.assistant").click()
    page.wait_for_function(IDLE)


def _reply(page):
    return page.locator(".message.assistant").last.inner_text()


def test_chat_regenerate_edit_commands_and_a_refused_message(page, tmp_path, chat_server, monkeypatch):
    # 10 ms per token, so the reply arrives as a stream of events rather than in one network read.
    scheduler = chat_server.app.state.pool.replicas[0].scheduler
    monkeypatch.setattr(scheduler, "model", SlowModel(scheduler.model, delay=0.01))
    assert page.title() == "NanoChat" and page.inner_text("h1") == "nanochat"
    assert page.is_disabled("#send")  # nothing typed yet
    # Count re-renders of the conversation: a streamed reply redraws once per token.
    page.evaluate("""() => {
        window.renders = 0;
        new MutationObserver(() => { window.renders += 1; })
            .observe(document.getElementById('messages'), {childList: true, subtree: true});
    }""")
    _send(page, "Hello! What can you do?")
    assert page.locator(".message.user").inner_text() == "Hello! What can you do?"
    for _ in range(5):  # now and then the micro model ends its reply on the very first token
        if page.locator(".message.assistant .empty").count() == 0:
            break
        _regenerate(page)
    first = _reply(page)
    assert first and page.evaluate("window.renders") > 3

    # Regenerate: a new sample (the server draws a fresh seed) replaces the reply.
    for _ in range(3):
        _regenerate(page)
        if _reply(page) != first:
            break
    assert _reply(page) != first
    assert page.locator(".message.assistant").count() == 1 and page.locator(".message.user").count() == 1

    # Edit: the message goes back into the input, and the conversation restarts from there.
    page.locator(".message.user").click()
    assert page.input_value("#input") == "Hello! What can you do?"
    assert page.locator(".message").count() == 0
    _send(page, "/temperature 1.5")
    _send(page, "/topk")
    assert page.locator(".message.console").all_inner_texts() == ["Temperature set to 1.5", "Current top-k: 50"]

    # Shift+Enter is a new line, not a send.
    page.fill("#input", "two")
    page.press("#input", "Shift+Enter")
    page.type("#input", "lines")
    assert page.input_value("#input") == "two\nlines" and page.locator(".message.user").count() == 0
    page.press("#input", "Enter")
    page.wait_for_function(IDLE)
    # A reply came (the micro model, on the fresh seed the server draws, now and then ends it at once: empty).
    assert page.locator(".message.user").inner_text() == "two\nlines" and page.locator(".message.assistant").count() == 1

    # A message over the server's limit: its error is shown and the text comes back to be shortened.
    index = page.evaluate("state.messages.length")  # 2, unless the reply was empty (an empty one is not kept)
    page.fill("#input", "x" * 8001)
    page.press("#input", "Enter")
    page.wait_for_function(IDLE)
    assert page.locator(".error").inner_text() == (f"Error: Message {index} is too long. Maximum 8000 characters "
                                                   "allowed per message")
    assert page.input_value("#input") == "x" * 8001 and page.locator(".message.user").count() == 1
    page.fill("#input", "")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and page.evaluate("document.activeElement.id") == "input"
    _send(page, "/help")
    assert "/temperature <value>" in page.locator(".message.console").inner_text()
    _send(page, "/clear")
    assert page.locator(".message").count() == 0 and page.evaluate("state.messages") == []


REPLY_PIECES = [
    "Here is **bold**, *italic* and `inline code`. 2*3*4 stays as it is.\n\n",
    "<img src=x onerror=\"window.pwned = 1\"><script>window.pwned = 2</script>\n\n",
    "- one\n- two\n\n",
    "The rate is 12/60 = $<|python_start|>12/60<|python_end|><|output_start|>0.2<|output_end|>0.2 a min",
    "ute.\n\n```python\nprint(\"<b>hi</b>\")\n```\n\n",
    "[bad](javascript:window.pwned=3) and [good](https://example.com) caf\u00e9",
]


def test_markdown_and_tool_calls_render_safely(page, tmp_path):
    # A scripted reply (the micro model writes noise), served in the server's event format.
    events = "".join(f"data: {json.dumps({'token': piece, 'gpu': 0})}\n\n" for piece in REPLY_PIECES)
    events += 'data: {"done": true}\n\n'
    page.route("**/chat/completions", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=events))
    _send(page, "Show me some formatting")
    reply = page.locator(".message.assistant")
    assert reply.locator("strong").inner_text() == "bold" and reply.locator("em").inner_text() == "italic"
    assert "2*3*4 stays as it is." in reply.inner_text()
    assert reply.locator("img").count() == 0 and reply.locator("script").count() == 0
    assert "<img src=x onerror=" in reply.inner_text() and page.evaluate("window.pwned") is None
    assert reply.locator("li").all_inner_texts() == ["one", "two"]
    assert reply.locator("pre code").inner_text() == 'print("<b>hi</b>")'
    assert reply.locator(".code-head").inner_text().startswith("python")
    chip = reply.locator(".tool")
    assert chip.inner_text().split() == ["calculator", "12/60", "=", "0.2"]
    assert "<|" not in reply.inner_text()
    links = reply.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com"
    assert links.get_attribute("rel") == "noopener noreferrer" and "café" in reply.inner_text()
    # What goes back to the server keeps the tool tokens by name (they become tokens again there).
    sent = []
    page.route("**/chat/completions", lambda route: (sent.append(route.request.post_data_json), route.fulfill(
        status=200, content_type="text/event-stream", body='data: {"token": "ok", "gpu": 0}\n\ndata: {"done": true}\n\n')))
    _send(page, "Thanks")
    assert sent[0]["messages"][1] == {"role": "assistant", "content": "".join(REPLY_PIECES)}

    # An event cut in two by the network still arrives whole.
    events = page.evaluate(r"""async () => {
        const bytes = new TextEncoder().encode('data: {"token": "caf\u00e9"}\n\ndata: {"done": true}\n\n');
        const stream = new ReadableStream({start(controller) {
            controller.enqueue(bytes.slice(0, 21));  // between the two bytes of the é, too
            controller.enqueue(bytes.slice(21));
            controller.close();
        }});
        const seen = [];
        await readEvents(new Response(stream), (event) => seen.push(event));
        return seen;
    }""")
    assert events == [{"token": "café"}, {"done": True}]

    # A phone-sized screen: nothing sticks out sideways, and the input stays on screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator(".message.user").first.scroll_into_view_if_needed()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#input").bounding_box()
    assert box["y"] + box["height"] <= 844
    page.screenshot(path=str(tmp_path / "phone.png"))
    page.set_viewport_size({"width": 1000, "height": 760})
    page.screenshot(path=str(tmp_path / "markdown.png"), full_page=True)


def test_the_send_button_stops_a_reply_and_a_notice_tells_of_dropped_turns(page):
    page.route("**/chat/completions", lambda route: None)  # a server that never answers
    page.fill("#input", "hang")
    page.press("#input", "Enter")
    assert page.get_attribute("body", "data-generating") == "true" and page.is_enabled("#send")
    assert page.locator(".typing").count() == 1
    page.click("#send")  # while a reply runs, the send button is the stop button
    page.wait_for_function(IDLE)
    assert page.locator(".message.assistant").inner_text() == "(empty reply; click to try again)"
    assert page.evaluate("state.messages") == [{"role": "user", "content": "hang"}]

    # Back to the real server: two 40-character messages no longer fit the micro model's context with room for a reply.
    page.unroute("**/chat/completions")
    _send(page, "a" * 40)
    assert page.locator(".message.notice").count() == 0
    _send(page, "b" * 40)
    assert page.locator(".message.notice").inner_text().endswith(
        f"oldest messages were left out to fit the model's context of {CHAT_CONTEXT} tokens.")


def test_a_long_chat_keeps_working_past_the_request_limits(page):
    # Ten turns of 7,000 characters each way add up to 140,000 characters, far past what one request may carry
    # (MAX_TOTAL_CHARS). The micro model's context could not hold a single such turn, so a scripted server answers,
    # checking each request with the real server's parser and refusing it as the real server would.
    from nanochat.serving import MAX_TOTAL_CHARS, RequestError, SamplingParams, parse_chat_request

    sent = []

    def answer(route):
        body = route.request.post_data_json
        sent.append(body)
        try:
            parse_chat_request(body, SamplingParams())
        except RequestError as err:
            return route.fulfill(status=400, content_type="application/json", body=json.dumps({"detail": str(err)}))
        reply = f"reply {len(sent)} " + "r" * 7000
        route.fulfill(status=200, content_type="text/event-stream",
                      body=f"data: {json.dumps({'token': reply, 'gpu': 0})}\n\ndata: {json.dumps({'done': True})}\n\n")

    page.route("**/chat/completions", answer)
    for turn in range(1, 11):
        text = f"turn {turn} " + "u" * 7000
        page.evaluate("text => { document.getElementById('input').value = text; }", text)
        page.press("#input", "Enter")
        page.wait_for_function(IDLE)
        assert page.locator(".error").count() == 0, page.locator(".error").first.inner_text()
        assert sent[-1]["messages"][-1] == {"role": "user", "content": text}  # the new message always goes
        assert _reply(page).startswith(f"reply {turn} ")
    assert len(sent) == 10 and page.locator(".message.assistant").count() == 10
    assert all(sum(len(m["content"]) for m in body["messages"]) <= MAX_TOTAL_CHARS for body in sent)
    assert all(body["messages"][0]["role"] == "user" for body in sent)  # whole turns left out
    assert len(sent[-1]["messages"]) >= 3  # and as much of the chat as fits is still sent
    assert "oldest messages were not sent" in page.locator(".message.notice").last.inner_text()
    # A message the server refuses is named by its place in the whole conversation, not in what was sent.
    page.evaluate("text => { document.getElementById('input').value = text; }", "x" * 8001)
    page.press("#input", "Enter")
    page.wait_for_function(IDLE)
    assert page.locator(".error").inner_text() == "Error: Message 20 is too long. Maximum 8000 characters allowed per message"
    assert len(sent[-1]["messages"]) < 21  # (the older turns were left out of this request too)
    # The refused message leaves the page too, though a "not sent" notice stood between it and its reply.
    assert page.locator(".message.user").count() == 10


def test_the_ui_asks_for_the_api_key_and_keeps_it_for_the_tab(browser, serve_chat):
    answers = ["", "wrong", "s3cret"]  # refused, mistyped, right
    asked = []

    def on_dialog(dialog):
        asked.append(dialog.message)
        answer = answers.pop(0)
        dialog.accept(answer) if answer else dialog.dismiss()

    with serve_chat("--api-key", "s3cret") as served:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("dialog", on_dialog)
        page.goto(served.url + "/")
        _send(page, "hello")  # no key yet: asked, and dismissed, so the message comes back to the input
        assert page.locator(".error").inner_text() == "Error: This server needs its API key; send again to enter it."
        assert page.input_value("#input") == "hello" and page.locator(".message.user").count() == 0
        page.fill("#input", "")
        _send(page, "hello")  # asked again: a wrong key, then the right one
        assert len(asked) == 3 and "refused" in asked[2]
        assert page.locator(".message.user").inner_text() == "hello" and page.locator(".message.assistant").count() == 1
        assert page.locator(".message.assistant .error").count() == 0
        _send(page, "and again")  # the key is kept: no more asking
        assert len(asked) == 3 and page.locator(".message.user").count() == 2
        assert page.evaluate("sessionStorage.getItem('nanochat-api-key')") == "s3cret"
        assert page.evaluate("localStorage.length") == 0 and "s3cret" not in page.url
        context.close()
        assert errors == [], errors
