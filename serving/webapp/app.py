"""The web app at ``/app``: accounts, classify and detect pages, model cards, steward reviews.

A Starlette app mounted on the API service (``bentoml.mount_asgi_app`` in
:mod:`serving.service`), so it is served by the same deployment and port as the HTTP API and
calls the same model services (``LeukoflowAPI.classifier`` / ``.detector``, found with
``bentoml.get_current_service()``), never a second copy of the models.

Security, in order of a request:

* ``ApiKeyMiddleware`` of the API leaves ``/app`` alone (``serving.auth.OPEN_PREFIXES``): the
  pages use their own session auth; the API's Bearer keys keep working unchanged.
* Sessions: Starlette's ``SessionMiddleware`` (itsdangerous-signed cookie, ``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` when ``webapp.secure_cookies``, path ``/app``, lifetime
  ``webapp.session_max_age_s``). The cookie carries the user id and the account's
  ``session_epoch``; logout and password change bump the epoch, so older cookies stop working.
* CSRF: a random per-session token (synchronizer token pattern) in a hidden field of every form;
  every POST without the matching token is refused with 403 before anything else happens.
* Login: argon2id hashes (:mod:`serving.webapp.accounts`); per account, ``max_failed_logins``
  failures lock it for ``lockout_s``; per client address, four times that many failures in the
  same window are refused too (429), so one address cannot walk through many accounts.
* Headers: a Content-Security-Policy that allows this origin only (no CDN could load even if a
  template named one), ``X-Frame-Options: SAMEORIGIN``, ``nosniff``, ``Referrer-Policy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from serving.decode import BadImage, NotExplainable, decode_upload
from serving.webapp import pages_data, render
from serving.webapp.accounts import AccountError, Accounts
from serving.webapp.offline import rewrite_data_docs
from training.config import Config, load_config
from training.contract import InputContract

__all__ = ["WEBAPP_PATH", "WebApp", "build_app", "create_app"]

log = logging.getLogger("leukoflow.webapp")

WEBAPP_PATH = "/app"  # where serving.service mounts it; serving.auth leaves it to the app
SESSION_COOKIE = "leukoflow_session"
FORM_OVERHEAD = 64 * 1024

_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-src 'self'; frame-ancestors 'self'; form-action 'self'; "
        "base-uri 'none'")
# GX's pages run inline scripts (bootstrap-table set-up) and Vega compiles expressions.
_DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
             "script-src 'self' 'unsafe-inline' 'unsafe-eval'; font-src 'self'; "
             "frame-ancestors 'self'")
_CARD_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"

ModelsProvider = Callable[[], Any]


def _current_service() -> Any:
    """The running ``LeukoflowAPI`` instance (under ``bentoml serve`` or ``to_asgi()``)."""
    import bentoml

    return bentoml.get_current_service()


def _secret(path: Path) -> str:
    """The session signing key: read, or made once with mode 0600."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


class _FailureWindow:
    """Failed logins per client address in a sliding window (in memory, per process)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window = limit, window_s
        self._hits: dict[str, deque[float]] = {}

    def _trim(self, key: str) -> deque[float]:
        hits, edge = self._hits.get(key, deque()), time.monotonic() - self.window
        while hits and hits[0] < edge:
            hits.popleft()
        if not hits:
            self._hits.pop(key, None)  # forget addresses whose failures expired
        return hits

    def blocked(self, key: str) -> int:
        """Seconds until ``key`` may try again (0: now)."""
        hits = self._trim(key)
        return int(hits[0] + self.window - time.monotonic()) + 1 if len(hits) >= self.limit else 0

    def fail(self, key: str) -> None:
        hits = self._trim(key)
        hits.append(time.monotonic())
        self._hits[key] = hits


class _SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = {b"content-security-policy": _CSP.encode(),
                         b"x-frame-options": b"SAMEORIGIN",
                         b"x-content-type-options": b"nosniff",
                         b"referrer-policy": b"same-origin"}
                headers += [(k, v) for k, v in extra.items() if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class _Web:
    """Everything the handlers share: config, accounts, templates, the model services."""

    def __init__(self, cfg: Config, models: ModelsProvider) -> None:
        w = cfg.webapp
        self.cfg, self.models = cfg, models
        self.accounts = Accounts(cfg.webapp_database_url, max_failed=w.max_failed_logins,
                                 lockout_s=w.lockout_s,
                                 min_password_length=w.min_password_length)
        self.by_address = _FailureWindow(4 * w.max_failed_logins, w.lockout_s)
        self.templates = Jinja2Templates(directory=str(files("serving.webapp") / "templates"))
        self.contract = InputContract.for_serving(cfg)  # one input contract with the API
        self.max_bytes = self.contract.max_bytes

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return token

    def user(self, request: Request) -> Any:
        uid, epoch = request.session.get("uid"), request.session.get("epoch")
        if uid is None:
            return None
        user = self.accounts.get(int(uid))
        if user is None or user.session_epoch != epoch:
            request.session.pop("uid", None)
            request.session.pop("epoch", None)
            return None
        return user

    def page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        ctx.setdefault("user", self.user(request))
        ctx.update(request=request, root=self.root(request), csrf=self.csrf(request),
                   registration=self.cfg.webapp.registration)
        return self.templates.TemplateResponse(request, template, ctx, status_code=status)

    def message(self, request: Request, status: int, title: str, text: str) -> Response:
        return self.page(request, "message.html", status=status, title=title, text=text)

    async def form(self, request: Request) -> Any:
        """The posted form after the CSRF check; a Response when the request is refused."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes + FORM_OVERHEAD:
            return self.message(request, 413, "Upload too large",
                                f"images may be at most {self.max_bytes} bytes")
        try:
            form = await request.form(max_files=1, max_fields=20)
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's fault
            return self.message(request, 400, "Bad form", f"the form could not be read: {exc}")
        sent, expected = form.get("csrf_token"), request.session.get("csrf")
        if not (isinstance(sent, str) and expected and secrets.compare_digest(sent, expected)):
            await form.close()
            return self.message(request, 403, "Form refused",
                                "the form's CSRF token is missing or does not match this "
                                "session: reload the page and send it again")
        return form

    async def call(self, family: str, method: str, **kwargs: Any) -> Any:
        """Call a model service like the API does (remote proxy, or a local object in tests)."""
        dep = getattr(self.models(), family)
        if dep is None:  # a deployment without this family (a cells-only site: no detector)
            raise _NotDeployed(f"this deployment serves no {family} model (none has been "
                               "promoted)")
        infer = getattr(self.models(), "infer", None)
        if infer is not None and set(kwargs) == {"image"}:  # as the API sends it: uint8 arrays
            return await infer(dep, method, kwargs["image"])
        to_async = getattr(dep, "to_async", None)
        if to_async is not None:
            return await getattr(to_async, method)(**kwargs)
        return await asyncio.to_thread(getattr(dep, method), **kwargs)

    async def image(self, form: Any) -> Image.Image:
        upload = form.get("image")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise BadImage("no image: choose a file to upload")
        data = await upload.read(self.max_bytes + 1)
        # the endpoint's input contract: the same rules, messages and pixel budget as the API
        return await asyncio.to_thread(decode_upload, data, contract=self.contract)


class _NotDeployed(RuntimeError):
    """The page's model family is not part of this deployment."""


def _model_error(what: str, exc: Exception) -> tuple[int, str]:
    from bentoml.exceptions import BentoMLException

    if isinstance(exc, _NotDeployed):
        return HTTPStatus.SERVICE_UNAVAILABLE, str(exc)
    if isinstance(exc, BentoMLException):
        status = int(getattr(exc, "error_code", HTTPStatus.INTERNAL_SERVER_ERROR))
        if status < 500:
            return status, f"the {what} refused the image: {exc}"
        return HTTPStatus.BAD_GATEWAY, f"the {what} failed on this image; the server log has " \
            "the details"
    return HTTPStatus.SERVICE_UNAVAILABLE, f"the {what} is not available; try again shortly"


def _plain(value: Any) -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return dict(value)


def _login_required(role: str | None = None) -> Callable[..., Any]:
    def wrap(handler: Callable[[_Web, Request, Any], Awaitable[Response]]) -> Any:
        async def endpoint(request: Request) -> Response:
            web: _Web = request.app.state.web
            user = web.user(request)
            if user is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{web.root(request)}/login?next={quote(target)}", 303)
            if role is not None and user.role != role:
                return web.message(request, 403, "Not allowed", f"this page needs the {role} "
                                   "role")
            if request.method == "POST":
                form = await web.form(request)
                if isinstance(form, Response):
                    return form
                try:
                    return await handler(web, request, user, form)
                finally:
                    await form.close()
            return await handler(web, request, user, None)

        endpoint.__name__ = handler.__name__
        return endpoint

    return wrap


# -------------------------------------------------------------------------- handlers
async def home(request: Request) -> Response:
    return request.app.state.web.page(request, "home.html")


async def login(request: Request) -> Response:
    web: _Web = request.app.state.web
    target = request.query_params.get("next", "")
    if request.method == "GET":
        return web.page(request, "login.html", next=target)
    form = await web.form(request)
    if isinstance(form, Response):
        return form
    target = str(form.get("next") or target)
    address = request.client.host if request.client else "?"
    wait = web.by_address.blocked(address)
    if wait:
        return web.page(request, "login.html", 429, next=target,
                        error=f"too many failed logins from this address: try again in {wait} s")
    username = str(form.get("username", ""))
    result = await asyncio.to_thread(web.accounts.login, username,
                                     str(form.get("password", "")))
    if result.status != "ok":
        web.by_address.fail(address)
        log.warning("failed login for %r from %s (%s)", username, address, result.status)
        if result.status == "locked":
            return web.page(request, "login.html", 429, next=target,
                            error="too many failed logins: this account is locked, try again "
                                  f"in {result.retry_after_s} s")
        return web.page(request, "login.html", 401, next=target,
                        error="wrong username or password")
    request.session.clear()
    request.session.update(uid=result.user_id, epoch=result.epoch,
                           csrf=secrets.token_urlsafe(32))
    root = web.root(request)
    safe = target.startswith(f"{root}/") and not target.startswith("//") and "\\" not in target
    return RedirectResponse(target if safe else f"{root}/classify", 303)


async def logout(request: Request) -> Response:
    web: _Web = request.app.state.web
    form = await web.form(request)
    if isinstance(form, Response):
        return form
    user = web.user(request)
    if user is not None:
        web.accounts.bump_epoch(user.id)
    request.session.clear()
    return RedirectResponse(f"{web.root(request)}/login", 303)


async def register(request: Request) -> Response:
    web: _Web = request.app.state.web
    user = web.user(request)
    is_admin = user is not None and user.role == "admin"
    if web.cfg.webapp.registration != "open" and not is_admin:
        return web.message(request, 403, "Registration closed", "accounts on this server are "
                           "created by an administrator: ask yours")
    if request.method == "GET":
        return web.page(request, "register.html")
    form = await web.form(request)
    if isinstance(form, Response):
        return form
    password = str(form.get("password", ""))
    if password != str(form.get("password2", "")):
        return web.page(request, "register.html", 400, error="the two passwords differ")
    role = str(form.get("role", "user")) if is_admin else "user"
    try:
        created = await asyncio.to_thread(web.accounts.create, str(form.get("username", "")),
                                          password, role)
    except AccountError as exc:
        return web.page(request, "register.html", 400, error=str(exc))
    if is_admin:
        return RedirectResponse(f"{web.root(request)}/admin?created={quote(created.username)}",
                                303)
    return RedirectResponse(f"{web.root(request)}/login?registered=1", 303)


@_login_required()
async def account(web: _Web, request: Request, user: Any, form: Any) -> Response:
    if form is None:
        return web.page(request, "account.html")
    new = str(form.get("new_password", ""))
    if new != str(form.get("new_password2", "")):
        return web.page(request, "account.html", 400, error="the two new passwords differ")
    try:
        epoch = await asyncio.to_thread(web.accounts.change_password, user.id,
                                        str(form.get("old_password", "")), new)
    except AccountError as exc:
        return web.page(request, "account.html", 400, error=str(exc))
    request.session["epoch"] = epoch  # this session stays; every other one is logged out
    return web.page(request, "account.html", user=web.user(request),
                    notice="password changed; other sessions were logged out")


@_login_required()
async def classify(web: _Web, request: Request, user: Any, form: Any) -> Response:
    if form is None:
        return web.page(request, "classify.html")
    try:
        img = await web.image(form)
    except BadImage as exc:
        return web.page(request, "classify.html", exc.status, error=str(exc))
    result, cam = await asyncio.gather(web.call("classifier", "classify", image=img),
                                       web.call("classifier", "explain", image=img),
                                       return_exceptions=True)
    for answer in (result, cam):
        if isinstance(answer, BaseException) and not isinstance(answer, NotExplainable):
            log.error("classify page: model call failed", exc_info=answer)
            status, text = _model_error("classifier", answer)  # shown as the API shows it
            return web.page(request, "classify.html", status, error=text)
    result = _plain(result)
    cam_uri, cam_note = None, None
    if isinstance(cam, NotExplainable):  # a hand-crafted champion: the answer, no heatmap
        cam_note = str(cam)
    else:
        png = cam["png"]
        if isinstance(png, str):  # a remote proxy may hand bytes back as base64 text
            import base64

            png = base64.b64decode(png)
        cam_uri = render.data_uri(png)
    return web.page(request, "classify.html", result=result,
                    chart=render.probability_svg(result["probabilities"], result["label"]),
                    input_uri=render.data_uri(render.thumbnail(img)),
                    cam_uri=cam_uri, cam_note=cam_note)


@_login_required()
async def detect(web: _Web, request: Request, user: Any, form: Any) -> Response:
    if form is None:
        return web.page(request, "detect.html")
    try:
        img = await web.image(form)
    except BadImage as exc:
        return web.page(request, "detect.html", exc.status, error=str(exc))
    try:
        result = _plain(await web.call("detector", "detect", image=img))
    except Exception as exc:  # noqa: BLE001
        log.exception("detect page: model call failed")
        status, text = _model_error("detector", exc)
        return web.page(request, "detect.html", status, error=text)
    boxes = [_plain(b) for b in result["boxes"]]
    png = await asyncio.to_thread(render.draw_boxes, img, boxes,
                                  list(web.cfg.data.detector_classes))
    return web.page(request, "detect.html", result=result, boxes=boxes,
                    counts=render.box_counts(boxes), image_uri=render.data_uri(png),
                    size=img.size)


@_login_required()
async def models_page(web: _Web, request: Request, user: Any, form: Any) -> Response:
    rows = await asyncio.to_thread(pages_data.registered_models, web.cfg)
    return web.page(request, "models.html", models=rows)


@_login_required()
async def model_page(web: _Web, request: Request, user: Any, form: Any) -> Response:
    name = request.path_params["name"]
    try:
        info = await asyncio.to_thread(pages_data.model_history, web.cfg, name)
    except LookupError as exc:
        return web.message(request, 404, "No such model", str(exc))
    return web.page(request, "model.html", model=info)


@_login_required()
async def model_card(web: _Web, request: Request, user: Any, form: Any) -> Response:
    name, version = request.path_params["name"], request.path_params["version"]
    try:
        page = await asyncio.to_thread(pages_data.card_html, web.cfg, name, version)
    except LookupError as exc:
        return web.message(request, 404, "No model card", str(exc))
    return HTMLResponse(page, headers={"Content-Security-Policy": _CARD_CSP})


@_login_required()
async def batches(web: _Web, request: Request, user: Any, form: Any) -> Response:
    rows = await asyncio.to_thread(pages_data.batches, web.cfg)
    return web.page(request, "batches.html", batches=rows)


@_login_required()
async def batch(web: _Web, request: Request, user: Any, form: Any) -> Response:
    try:
        info = await asyncio.to_thread(pages_data.batch, web.cfg, request.path_params["batch_id"])
    except LookupError as exc:
        return web.message(request, 404, "No such batch", str(exc))
    return web.page(request, "batch.html", batch=info)


@_login_required()
async def quarantine_page(web: _Web, request: Request, user: Any, form: Any) -> Response:
    batch_id = request.path_params["batch_id"]
    try:
        page = await asyncio.to_thread(pages_data.quarantine_html, web.cfg, batch_id,
                                       web.root(request))
    except LookupError as exc:
        return web.message(request, 404, "No report", str(exc))
    return HTMLResponse(page, headers={"Content-Security-Policy": _CARD_CSP})


@_login_required()
async def data_docs(web: _Web, request: Request, user: Any, form: Any) -> Response:
    path = request.path_params["path"]
    try:
        data, media = await asyncio.to_thread(pages_data.docs_file, web.cfg, path)
    except LookupError as exc:
        return web.message(request, 404, "Not in the Data Docs", str(exc))
    if media == "text/html":
        page = rewrite_data_docs(data.decode("utf-8", "replace"),
                                 f"{web.root(request)}/static/vendor")
        return HTMLResponse(page, headers={"Content-Security-Policy": _DOCS_CSP})
    return Response(data, media_type=media, headers={"Content-Security-Policy": _DOCS_CSP})


@_login_required(role="admin")
async def admin(web: _Web, request: Request, user: Any, form: Any) -> Response:
    from training.apikeys import SCOPES, create_key, list_keys

    ctx: dict[str, Any] = {"scopes": SCOPES, "created": request.query_params.get("created")}
    status = 200
    if form is not None:
        name = str(form.get("key_name", "")).strip()
        scopes = [s for s in SCOPES if form.get(f"scope_{s}")] or ["classify"]
        try:
            ctx["new_key"] = await asyncio.to_thread(create_key, web.cfg.api_keys_file, name,
                                                     scopes)
            ctx["new_key_name"] = name
        except Exception as exc:  # noqa: BLE001 - ConfigError with the reason
            ctx["error"], status = str(exc), 400
    ctx["users"] = web.accounts.list()
    ctx["keys"] = list_keys(web.cfg.api_keys_file)
    return web.page(request, "admin.html", status, **ctx)


def build_app(cfg: Config, models: ModelsProvider = _current_service) -> Starlette:
    """The web app as a Starlette app (mount it at :data:`WEBAPP_PATH`)."""
    static = StaticFiles(packages=[("serving.webapp", "static")])
    routes = [
        Route("/", home), Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/register", register, methods=["GET", "POST"]),
        Route("/account", account, methods=["GET", "POST"]),
        Route("/classify", classify, methods=["GET", "POST"]),
        Route("/detect", detect, methods=["GET", "POST"]),
        Route("/models", models_page), Route("/models/{name}", model_page),
        Route("/models/{name}/versions/{version}/card", model_card),
        Route("/batches", batches), Route("/batches/{batch_id}", batch),
        Route("/batches/{batch_id}/quarantine", quarantine_page),
        Route("/docs/{path:path}", data_docs),
        Route("/admin", admin, methods=["GET", "POST"]),
        Mount("/static", static, name="static"),
    ]
    w = cfg.webapp
    app = Starlette(routes=routes, middleware=[
        Middleware(_SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=_secret(cfg.webapp_secret_file),
                   session_cookie=SESSION_COOKIE, max_age=w.session_max_age_s,
                   path=WEBAPP_PATH, same_site="strict", https_only=w.secure_cookies),
    ])
    app.state.web = _Web(cfg, models)
    return app


class WebApp(Starlette):
    """The web app as mounted by :mod:`serving.service`: built when the server starts.

    BentoML runs the lifespan of a mounted Starlette app when the service starts, in the
    serving process; the config (``LEUKOFLOW_*``) is read there, not when ``serving.service``
    is imported (by ``bentoml build``, say). Without a lifespan (a bare ASGI server), the app is
    built on the first request.
    """

    def __init__(self, cfg: Config | None = None, models: ModelsProvider | None = None) -> None:
        self._cfg, self._models = cfg, models
        self._app: Starlette | None = None
        # one catch-all route, so BentoML's PassiveMount (which asks the routes) matches
        super().__init__(routes=[Mount("", app=self._dispatch)], lifespan=self._lifespan)

    def build(self) -> Starlette:
        self._app = build_app(self._cfg or load_config(), self._models or _current_service)
        return self._app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.build()  # again at every start: a new server process, or a new test app
        yield

    async def _dispatch(self, scope: dict, receive: Any, send: Any) -> None:
        app = self._app or self.build()
        await app(scope, receive, send)


def create_app(cfg: Config | None = None, models: ModelsProvider | None = None) -> WebApp:
    return WebApp(cfg, models)
