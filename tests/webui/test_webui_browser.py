"""The web UI in a real headless Chromium (Playwright driving the system's chromium), one user's journey with a
tiny model: open, upload data, Plan, Start, see the loss curve, Stop (a checkpoint), Resume to the end, chat
with the new adapter (streamed), evaluate (the F1 table). Each step leaves a screenshot in
tests/artifacts/webui/ for people to look at (the README's picture is one of them)."""

from __future__ import annotations

import time

import pytest

STEP_TIMEOUT_MS = 120_000  # a hang guard only: each step takes seconds


@pytest.fixture(scope="module")
def page(webui, chromium, artifacts):
    from playwright.sync_api import sync_playwright

    page_shots[:] = [artifacts / "webui"]
    page_shots[0].mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(STEP_TIMEOUT_MS)
        yield page
        browser.close()


# The live loss plot (a figure drawn on the server) is on the page.
DRAWN = """id => { const img = document.querySelector('#' + id + ' img');
    return img && img.complete && img.naturalWidth > 100; }"""


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def _fill(page, elem_id: str, value: str) -> None:
    box = _field(page, elem_id)
    box.fill(value)
    box.press("Enter") if page.locator(f"#{elem_id} [role=combobox], #{elem_id} input[role]").count() else None
    box.blur()


def _text(page, elem_id: str) -> str:
    return _field(page, elem_id).input_value()


def _wait_text(page, elem_id: str, pattern: str) -> str:
    page.wait_for_function(
        "([id, re]) => { const el = document.querySelector('#' + id + ' textarea, #' + id + "
        "' input'); return el && new RegExp(re).test(el.value); }",
        arg=[elem_id, pattern],
    )
    return _text(page, elem_id)


page_shots: list = []  # the screenshots' dir, once the fixture has made it


def _shot(page, name: str) -> None:
    page.screenshot(path=str(page_shots[0] / f"{name}.png"), full_page=False)


def test_journey_upload_plan_train_stop_resume_chat_evaluate(page, webui, make_data, tmp_path):
    page.goto(webui.url)
    page.get_by_role("tab", name="Train").wait_for()
    _shot(page, "01-open")
    # the preference settings are open at the top, beside the adapter a STAGE=dpo/kto run would continue
    for elem in ("train-STAGE", "train-PREF_LOSS", "train-PREF_BETA", "train-ADAPTER_DIR"):
        assert page.locator(f"#{elem}").is_visible(), elem
    assert _text(page, "train-STAGE") == "sft"

    # upload a small JSONL: it lands in data/ and its record count shows
    upload = make_data(n_train=30, n_dev=2, seed=5) / "train.jsonl"
    mine = tmp_path / "my_triplets.jsonl"
    mine.write_bytes(upload.read_bytes())
    page.locator("#train-upload input[type=file]").set_input_files(str(mine))
    info = _wait_text(page, "train-data-info", "valid of")
    assert info.startswith("data/my_triplets.jsonl: 30 valid of 30 records, format context_target")
    assert (webui.project / "data" / "my_triplets.jsonl").read_bytes() == upload.read_bytes()
    _shot(page, "02-uploaded")

    # the settings, then Plan: what `make info` prints, with the tier
    for elem, value in (
        ("train-MODEL_NAME", "models/tiny-glm"),
        ("train-OUTPUT_DIR", "models/browser-run"),
        ("train-MAX_STEPS", "300"),
        ("train-MAX_SEQ_LEN", "256"),
        ("train-MAX_SAMPLES", "24"),
    ):
        _fill(page, elem, value)
    page.locator("#train-advanced > button.label-wrap").click()  # Advanced settings, then its [train] section
    page.locator("#train-section-train > button.label-wrap").click()
    for elem, value in (("train-SAVE_STEPS", "5"), ("train-LOGGING_STEPS", "1"), ("train-EVAL_STEPS", "10")):
        _fill(page, elem, value)
    page.locator("#train-plan").click()
    plan = _wait_text(page, "train-plan-out", "tier")
    assert "tier" in plan and "predicted peak" in plan, plan
    assert _text(page, "train-command").startswith("python -m app info MODEL_NAME=models/tiny-glm")
    page.locator("#train-plan-out").scroll_into_view_if_needed()
    _shot(page, "03-plan")

    # Start: the command shown is the one that runs; the loss curve appears as steps are logged
    page.locator("#train-start").click()
    command = _wait_text(page, "train-command", "^python -m app train ")
    assert "OUTPUT_DIR=models/browser-run" in command and "MAX_STEPS=300" in command
    _wait_text(page, "train-progress", r"^step ([8-9]|\d\d+)/300")
    page.locator("#train-curve").scroll_into_view_if_needed()
    page.wait_for_function(DRAWN, arg="train-curve")
    _shot(page, "04-training")

    # Stop = SIGTERM: the run saves a checkpoint and says so
    page.locator("#train-stop").click()
    stopped = _wait_text(page, "train-status", "^stopped at step")
    assert "checkpoint models/browser-run/checkpoints/checkpoint-" in stopped and "Resume" in stopped
    step_stopped = int(stopped.split()[3].rstrip(":"))
    assert step_stopped < 300
    page.locator("#train-status").scroll_into_view_if_needed()
    _shot(page, "05-stopped")

    # Resume to the end
    page.locator("#train-resume").click()
    _wait_text(page, "train-status", "^finished: 300 steps")
    assert _text(page, "train-progress").startswith("step 300/300")
    summary = (webui.project / "models" / "browser-run" / "summary.json").read_text()
    assert '"steps": 300' in summary
    assert "NUM_EPOCHS" not in command and "WEIGHT_DECAY" not in command  # only what was changed
    time.sleep(2.5)  # the plot's last redraw (one every 2 s while points arrive) has settled
    page.wait_for_function(DRAWN, arg="train-curve")
    page.locator("#train-curve").scroll_into_view_if_needed()
    page.mouse.wheel(0, -250)  # the run's state and progress above the plot in the picture too
    time.sleep(1)
    _shot(page, "06-finished")

    # Chat with the new adapter: the answer streams in
    page.get_by_role("tab", name="Chat").click()
    _fill(page, "chat-model", "models/browser-run")
    _fill(page, "chat-MAX_NEW_TOKENS", "24")
    _field(page, "chat-input").fill("《三体》的作者是谁？")
    # every change of the answer's text, as the page renders it
    page.evaluate("""() => { window.__answers = [];
        new MutationObserver(() => { const bots = document.querySelectorAll('#chat-box .bot');
            if (bots.length) window.__answers.push(bots[bots.length - 1].innerText); })
        .observe(document.querySelector('#chat-box'), {subtree: true, childList: true, characterData: true}); }""")
    page.locator("#chat-send").click()
    # the first message starts `serve` for the adapter's base; then the answer's text changes as tokens arrive
    page.wait_for_function("() => window.__answers.some(a => a.trim() && !a.startsWith('Loading'))")
    seen = -1
    while seen != (seen := len(page.evaluate("window.__answers"))):  # until it has stopped changing for 2 s
        time.sleep(2)
    answers = [a for a in dict.fromkeys(page.evaluate("window.__answers")) if a.strip() and not a.startswith("Loading")]
    assert len(answers) >= 2 and all(answers[-1].startswith(a) for a in answers), answers  # it grew: streamed
    _shot(page, "07-chat")

    # Evaluate on the dev file: the F1 table
    page.get_by_role("tab", name="Evaluate").click()
    _fill(page, "eval-run", "models/browser-run")
    _fill(page, "evaluate-EVAL_PATH", "data/dev.jsonl")
    _fill(page, "evaluate-EVAL_SAMPLES", "4")
    page.locator("#eval-start").click()
    _wait_text(page, "eval-message", "^done: python -m app evaluate")
    table = page.locator("#eval-metrics")
    table.get_by_text("triplet_f1", exact=True).wait_for()
    assert "triplet_precision" in table.inner_text() and "triplet_recall" in table.inner_text()
    page.locator("#eval-metrics").scroll_into_view_if_needed()
    _shot(page, "08-evaluate")
