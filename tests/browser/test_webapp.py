"""The web app in a real headless Chromium: accounts, classify, detect, models, steward pages.

Each test starts with a fresh browser context (no cookies); screenshots go to docs/img/ with
UPDATE_DOCS_IMG=1.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser.conftest import PASSWORD, Site, shot

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _register(page: Any, site: Site, username: str, screenshot: str | None = None) -> None:
    page.goto(f"{site.url}/register")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    if screenshot:
        shot(page, screenshot)
    page.click("#register-form button[type=submit]")
    page.wait_for_url(re.compile(r"/app/login\?registered=1$"))


def _login(page: Any, site: Site, username: str, password: str = PASSWORD) -> int:
    page.goto(f"{site.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    with page.expect_navigation() as nav:
        page.click("#login-form button[type=submit]")
    return nav.value.status if nav.value else 0


@pytest.fixture(scope="module")
def account(site: Site, browser: Any) -> str:
    """One registered account for the tests that only need to be logged in."""
    ctx = browser.new_context()
    page = ctx.new_page()
    _register(page, site, "labtech")
    ctx.close()
    return "labtech"


def test_register_log_in_and_classify(page: Any, site: Site) -> None:
    shot_home = page.goto(f"{site.url}/")
    assert shot_home.status == 200
    shot(page, "home")
    _register(page, site, "ana.lab", screenshot="register")
    shot(page, "login")
    _login(page, site, "ana.lab")
    assert page.url.endswith("/app/classify")
    page.set_input_files("input[name=image]", str(site.cell))
    page.click("#classify-form button[type=submit]")
    page.wait_for_selector("#classification")
    assert page.inner_text("#predicted-label") == "all"
    assert "leukemia-classifier" in page.inner_text("#model-version")
    assert "version 1" in page.inner_text("#model-version")
    bars = page.locator("#probabilities svg g.bar")
    assert bars.count() == 2
    assert {bars.nth(i).get_attribute("data-label") for i in range(2)} == {"all", "hem"}
    assert "83.0%" in page.inner_text("#probabilities")
    for img in ("#input-image", "#gradcam"):  # both decoded and drawn by the browser
        assert page.eval_on_selector(img, "e => e.complete && e.naturalWidth > 0")
    shot(page, "classify")
    assert page.blocked == []  # type: ignore[attr-defined]
    page.click("button:has-text('Log out')")
    page.wait_for_url(re.compile(r"/app/login$"))
    page.goto(f"{site.url}/classify")
    assert "/app/login?next=" in page.url  # the session is gone


def test_detect_draws_boxes_and_counts(page: Any, site: Site, account: str) -> None:
    _login(page, site, account)
    page.goto(f"{site.url}/detect")
    page.set_input_files("input[name=image]", str(site.field_image))
    page.click("#detect-form button[type=submit]")
    page.wait_for_selector("#detection")
    n = len(site.cfg.data.detector_classes) and page.locator("#boxes tr").count() - 1
    assert n >= 1 and page.inner_text("#box-total") == str(n)
    assert page.inner_text("#counts").split()[-2:] == ["WBC", str(n)]
    assert page.eval_on_selector("#boxes-image", "e => e.complete && e.naturalWidth > 0")
    assert "wbc-detector" in page.inner_text("#model-version")
    shot(page, "detect")


def test_a_champion_without_grad_cam_still_answers_on_the_page(page: Any, site: Site,
                                                                account: str) -> None:
    from tests.browser.conftest import FakeModels

    FakeModels.classifier.explainable = False
    try:
        _login(page, site, account)
        page.goto(f"{site.url}/classify")
        page.set_input_files("input[name=image]", str(site.cell))
        page.click("#classify-form button[type=submit]")
        page.wait_for_selector("#classification")
        assert page.inner_text("#predicted-label") == "all"
        assert "Grad-CAM explains neural networks only" in page.inner_text("#gradcam-note")
        assert page.locator("#gradcam").count() == 0
    finally:
        FakeModels.classifier.explainable = True


def test_bad_upload_shows_the_api_message(page: Any, site: Site, account: str,
                                          tmp_path: Any) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    _login(page, site, account)
    page.goto(f"{site.url}/classify")
    page.set_input_files("input[name=image]", str(bad))
    with page.expect_navigation() as nav:
        page.click("#classify-form button[type=submit]")
    assert nav.value.status == 400
    assert "not an image: the bytes match no known image format" in page.inner_text(".error")


def test_wrong_password_is_refused_then_rate_limited(page: Any, site: Site, browser: Any) -> None:
    ctx = browser.new_context()
    _register(ctx.new_page(), site, "victim")
    ctx.close()
    assert _login(page, site, "victim", "wrong password 1") == 401
    assert "wrong username or password" in page.inner_text(".error")
    shot(page, "login-refused")
    assert _login(page, site, "victim", "wrong password 2") == 401
    assert _login(page, site, "victim", "wrong password 3") == 429  # max_failed_logins = 3
    # locked: even the right password is refused, without being checked
    assert _login(page, site, "victim", PASSWORD) == 429
    assert "account is locked" in page.inner_text(".error")
    assert "/app/login" in page.url


def test_pages_without_a_session_redirect_to_login(page: Any, site: Site) -> None:
    for path in ("/classify", "/detect", "/models", "/batches", "/admin"):
        page.goto(f"{site.url}{path}")
        assert re.search(r"/app/login\?next=/app" + re.escape(path) + "$", page.url), page.url
        assert page.is_visible("#login-form")


def test_form_without_its_csrf_token_is_refused(page: Any, site: Site, account: str) -> None:
    _login(page, site, account)
    page.goto(f"{site.url}/account")
    page.eval_on_selector("#password-form input[name=csrf_token]", "e => e.remove()")
    page.fill("input[name=old_password]", PASSWORD)
    page.fill("input[name=new_password]", "another long password")
    page.fill("input[name=new_password2]", "another long password")
    with page.expect_navigation() as nav:
        page.click("#password-form button[type=submit]")
    assert nav.value.status == 403
    assert "CSRF token is missing" in page.inner_text(".error")
    # the password did not change: the old one still logs in
    page.context.clear_cookies()
    _login(page, site, account)
    assert page.url.endswith("/app/classify")


def test_password_change_logs_out_other_sessions(page: Any, site: Site, browser: Any) -> None:
    ctx = browser.new_context()
    other = ctx.new_page()
    _register(other, site, "changer")
    _login(other, site, "changer")
    _login(page, site, "changer")
    page.goto(f"{site.url}/account")
    page.fill("input[name=old_password]", PASSWORD)
    page.fill("input[name=new_password]", "a brand new passphrase")
    page.fill("input[name=new_password2]", "a brand new passphrase")
    page.click("#password-form button[type=submit]")
    page.wait_for_selector(".notice")
    other.goto(f"{site.url}/classify")  # the other session's cookie is now stale
    assert "/app/login" in other.url
    ctx.close()


def test_model_page_shows_the_champion_card_and_gate_history(page: Any, site: Site,
                                                             account: str) -> None:
    _login(page, site, account)
    page.goto(f"{site.url}/models")
    shot(page, "models")
    page.click("text=leukemia-classifier")
    rows = page.locator("#versions tr.version")
    assert rows.count() == 3
    assert "champion" in rows.nth(0).inner_text() and "passed" in rows.nth(0).inner_text()
    assert "failed" in rows.nth(1).inner_text()
    assert "balanced_accuracy=" in rows.nth(1).inner_text()
    card = page.frame_locator("#champion-card")
    assert "Model card: leukemia-classifier v3" in card.locator("h1").inner_text()
    assert card.locator("#calibration svg").count() == 1
    assert "Known limitations" in card.locator("body").inner_text()
    page.wait_for_timeout(300)
    shot(page, "model")
    page.goto(f"{site.url}/models/leukemia-classifier/versions/3/card")
    shot(page, "model-card")


def test_steward_batch_list_and_quarantine_report(page: Any, site: Site, account: str) -> None:
    _login(page, site, account)
    page.goto(f"{site.url}/batches")
    row = page.locator(f"#batches tr[data-batch='{site.batch_id}']")
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "accepted" and int(cells[5]) > 0 and int(cells[4]) > 0
    assert cells[6]  # publication time
    shot(page, "batches")
    row.locator("text=quarantine").click()
    thumbs = page.locator("table img[src^='data:image/png;base64,']")
    assert thumbs.count() >= 1  # decodable quarantined files are shown, the rest have reasons
    assert page.eval_on_selector("table img", "e => e.complete && e.naturalWidth > 0")
    text = page.inner_text("body")
    assert "duplicate" in text and "not_decodable" in text
    shot(page, "quarantine")
    link = page.locator("a", has_text="GX Data Docs")
    assert link.get_attribute("href").startswith("/app/docs/")


def test_data_docs_are_styled_with_no_network(page: Any, site: Site, account: str) -> None:
    _login(page, site, account)
    page.goto(f"{site.url}/batches/{site.batch_id}")
    page.click("text=GX Data Docs")
    page.wait_for_load_state("networkidle")
    assert "/app/docs/" in page.url
    assert page.blocked == []  # type: ignore[attr-defined]  # nothing tried to leave
    # Bootstrap's stylesheet applies (unstyled text would be Times at 16px, no card borders)
    font = page.evaluate("getComputedStyle(document.body).fontFamily")
    assert "Times" not in font and "apple-system" in font.replace("-apple", "apple")
    assert page.evaluate("!!window.jQuery && !!jQuery.fn.bootstrapTable")
    assert page.evaluate("""() => { const c = document.querySelector('.card');
        return !!c && getComputedStyle(c).borderTopStyle === 'solid'; }""")
    shot(page, "data-docs")


def test_admin_creates_an_api_key(page: Any, site: Site) -> None:
    from serving.webapp.accounts import Accounts
    from training.apikeys import verify

    Accounts(site.cfg.webapp_database_url).create("chief", PASSWORD, "admin")
    _login(page, site, "chief")
    page.goto(f"{site.url}/admin")
    page.fill("input[name=key_name]", "lab-lis")
    page.click("#key-form button[type=submit]")
    key = page.inner_text("#new-key")
    assert verify(site.cfg.api_keys_file, key, "classify") is not None
    assert "lab-lis" in page.inner_text("#keys")
    page.evaluate("document.querySelector('#new-key').textContent = 'lf_…(shown once)'")
    shot(page, "admin")
    page.click("text=Create an account")  # registration by an admin, with a role
    page.fill("input[name=username]", "steward.sam")
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.select_option("select[name=role]", "user")
    page.click("#register-form button[type=submit]")
    page.wait_for_url(re.compile(r"/app/admin\?created=steward.sam$"))
    assert "steward.sam" in page.inner_text("#users")
