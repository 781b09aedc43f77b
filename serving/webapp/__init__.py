"""The clinic web app and the steward's pages, mounted at ``/app`` of the API service.

See :mod:`serving.webapp.app` (routes and security) and ``docs/webapp.md``.
"""

from serving.webapp.app import WEBAPP_PATH, WebApp, build_app, create_app

__all__ = ["WEBAPP_PATH", "WebApp", "build_app", "create_app"]
