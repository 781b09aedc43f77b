"""Web app parts without a browser: accounts and lock-out, offline Data Docs, drawing."""

from __future__ import annotations

import io
from importlib.resources import files
from pathlib import Path

import pytest
from PIL import Image

from serving.auth import ApiKeyMiddleware
from serving.webapp import render
from serving.webapp.accounts import AccountError, Accounts
from serving.webapp.offline import CDN_MAP, DROPPED, external_urls, rewrite_data_docs

GX_TEMPLATES = Path(__import__("great_expectations").__file__).parent / "render" / "view" / \
    "templates"


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    return Accounts(f"sqlite:///{tmp_path / 'users.db'}", max_failed=3, lockout_s=60,
                    min_password_length=8)


def test_passwords_are_argon2_hashes_and_checked(accounts: Accounts) -> None:
    user = accounts.create("ana", "long enough")
    assert user.password_hash.startswith("$argon2id$") and "long enough" not in user.password_hash
    assert accounts.login("ana", "long enough").status == "ok"
    assert accounts.login("ana", "wrong one!").status == "wrong"
    assert accounts.login("nobody", "long enough").status == "wrong"
    with pytest.raises(AccountError, match="taken"):
        accounts.create("ana", "long enough")
    with pytest.raises(AccountError, match="at least 8"):
        accounts.create("bob", "short")
    with pytest.raises(AccountError, match="username"):
        accounts.create("a b", "long enough")


def test_lockout_after_failures_refuses_even_the_right_password(accounts: Accounts) -> None:
    accounts.create("ana", "long enough")
    assert [accounts.login("ana", "nope nope").status for _ in range(3)] == \
        ["wrong", "wrong", "locked"]
    locked = accounts.login("ana", "long enough")
    assert locked.status == "locked" and 0 < locked.retry_after_s <= 61


def test_a_success_resets_the_failure_count(accounts: Accounts) -> None:
    accounts.create("ana", "long enough")
    for _ in range(2):
        accounts.login("ana", "nope nope")
    assert accounts.login("ana", "long enough").status == "ok"
    assert [accounts.login("ana", "nope nope").status for _ in range(2)] == ["wrong", "wrong"]


def test_password_change_bumps_the_session_epoch(accounts: Accounts) -> None:
    user = accounts.create("ana", "long enough")
    with pytest.raises(AccountError, match="current password"):
        accounts.change_password(user.id, "not it at all", "new password!")
    assert accounts.change_password(user.id, "long enough", "new password!") == 1
    assert accounts.login("ana", "long enough").status == "wrong"
    assert accounts.login("ana", "new password!").epoch == 1


def test_every_cdn_asset_of_gx_data_docs_is_vendored_or_dropped() -> None:
    """A GX upgrade that adds a CDN asset fails here, not on a clinic's offline network."""
    found = set()
    for template in GX_TEMPLATES.rglob("*.j2"):
        found |= set(external_urls(template.read_text()))
    assert found, "GX's Data Docs templates moved: update the scan"
    assert found - set(CDN_MAP) - set(DROPPED) == set()
    vendor = files("serving.webapp") / "static" / "vendor"
    for local in CDN_MAP.values():
        assert (vendor / local).is_file(), local
    assert (vendor / "fontawesome" / "webfonts" / "fa-solid-900.woff2").is_file()


def test_rewrite_leaves_no_external_asset() -> None:
    page = "".join(f'<link rel="stylesheet" href="{u}"><script src="{u}"></script>'
                   for u in [*CDN_MAP, *DROPPED, "https://example.org/new.js"])
    page += '<a href="https://greatexpectations.io">GX</a>'
    out = rewrite_data_docs(page, "/app/static/vendor")
    assert external_urls(out) == []
    assert '/app/static/vendor/bootstrap/bootstrap.min.css' in out
    assert 'href="https://greatexpectations.io"' in out  # a plain link fetches nothing


def test_web_app_paths_are_left_to_the_web_app(tmp_path: Path) -> None:
    from training.apikeys import KeyStore

    mw = ApiKeyMiddleware(lambda *a: None, store=KeyStore(tmp_path / "keys.json", env={}))
    assert mw._is_open("/app") and mw._is_open("/app/login") and mw._is_open("/app/static/x")
    assert not mw._is_open("/apple") and not mw._is_open("/classify")


def test_boxes_are_drawn_and_counted() -> None:
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    boxes = [{"x1": 10, "y1": 10, "x2": 60, "y2": 60, "label": "WBC", "confidence": 0.9},
             {"x1": 100, "y1": 20, "x2": 150, "y2": 80, "label": "WBC", "confidence": 0.5}]
    out = Image.open(io.BytesIO(render.draw_boxes(img, boxes, ["WBC"]))).convert("RGB")
    assert out.size == (200, 100)
    assert out.getpixel((10, 40)) != (255, 255, 255)  # the left edge of the first box
    assert out.getpixel((80, 90)) == (255, 255, 255)  # outside every box
    assert render.box_counts(boxes) == [("WBC", 2)]
    svg = render.probability_svg({"all": 0.25, "hem": 0.75}, "hem")
    assert svg.index('data-label="hem"') < svg.index('data-label="all"')
    assert "75.0%" in svg and "<script" not in svg


def test_the_first_admin_is_made_on_the_command_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from serving.webapp.__main__ import main

    monkeypatch.setenv("LEUKOFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("sys.stdin", io.StringIO("a long admin password\n"))
    assert main(["create-user", "root.admin", "--admin", "--password-stdin"]) == 0
    assert main(["list"]) == 0
    assert "root.admin\tadmin" in capsys.readouterr().out
    users = Accounts(f"sqlite:///{tmp_path / 'home' / 'webapp.db'}")
    assert users.login("root.admin", "a long admin password").status == "ok"


def test_failures_per_address_block_then_expire(monkeypatch) -> None:
    from serving.webapp import app as webapp

    now = [1000.0]
    monkeypatch.setattr(webapp.time, "monotonic", lambda: now[0])
    window = webapp._FailureWindow(limit=2, window_s=60)
    window.fail("10.0.0.1")
    assert window.blocked("10.0.0.1") == 0
    window.fail("10.0.0.1")
    assert window.blocked("10.0.0.1") == 61 and window.blocked("10.0.0.2") == 0
    now[0] += 61
    assert window.blocked("10.0.0.1") == 0 and window._hits == {}
