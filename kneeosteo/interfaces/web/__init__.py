"""`kneeosteo serve`: one offline web page and a small HTTP API around a trained model.

FastAPI and uvicorn are imported here, not by the rest of the package, so that the CLI and the
library work without them."""

from kneeosteo.interfaces.web.app import DEFAULT_CAVEAT, WebSettings, create_app
from kneeosteo.interfaces.web.server import serve_in_thread

__all__ = ["DEFAULT_CAVEAT", "WebSettings", "create_app", "serve_in_thread"]
