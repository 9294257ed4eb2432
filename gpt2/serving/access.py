"""Who may talk to `python -m gpt2.serve`, checked on every request before any route runs (an ASGI middleware).

- Host: the Host header must name this server (localhost, 127.0.0.1, [::1], the address it listens on, or
  an --allow-host name). A web page elsewhere can point its own domain at 127.0.0.1 (DNS rebinding) and so
  reach a local server; its requests still carry its domain in Host, and are refused (421).
- API key: with --api-key (or GPT2_SPEEDRUN_API_KEY) every path but the page at / needs
  `Authorization: Bearer KEY`, as OpenAI's API does (401 otherwise). The page itself holds nothing: it asks
  for the key and sends it with its requests.
- Content-Type: a POST must say application/json (415 otherwise). A browser sends a cross-origin POST of
  text/plain or form data without asking the server first (no CORS preflight); application/json needs that
  preflight, which this server never grants.
"""

import ipaddress
import secrets
from typing import Optional

from gpt2.serving.request import RequestError, error_body

KEY_ENV = "GPT2_SPEEDRUN_API_KEY"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/",)  # the page: readable without the key


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def exposure_warning(host: str, port: int, api_key: Optional[str]) -> Optional[str]:
    """The one-line warning for a --host beyond this machine, or None."""
    if is_loopback(host):
        return None
    key = ("an API key is required" if api_key else
           f"no API key is set, so anyone who reaches it can use it (set one with --api-key or {KEY_ENV})")
    return f"warning: --host {host}: the API on port {port} is reachable from the network; {key}"


def allowed_hosts(bound_host: str, extra=()) -> frozenset:
    """Names the Host header may carry (lower case, without port); '*' among them allows any."""
    names = set(LOCAL_HOSTS) | {h.lower() for h in extra}
    bound = bound_host.lower()
    if bound not in ("0.0.0.0", "::", ""):  # "every address" is no name a client sends
        names.add(f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound)
    return frozenset(names)


def host_name(header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0]


class AccessGuard:
    """ASGI middleware: refuses, in OpenAI's error shape, a request with a foreign Host, without the API key,
    or a POST that is not JSON; lets the rest through to `app`."""

    def __init__(self, app, *, hosts: frozenset, api_key: Optional[str] = None):
        self.app, self.hosts = app, hosts
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        response = JSONResponse(error_body(str(refusal), kind=refusal.kind, code=refusal.code),
                                status_code=refusal.status, headers=refusal.headers)
        await response(scope, receive, send)

    def refusal(self, scope) -> Optional[RequestError]:
        headers = {name.lower(): value for name, value in scope["headers"]}
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and host not in self.hosts:
            return RequestError(f"Host {host!r} is not a name this server answers to ({', '.join(sorted(self.hosts))}"
                                f"); start it with --allow-host NAME to add one", status=421, code="host_not_allowed")
        if self.key is not None and not (scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS):
            refusal = self._key_refusal(headers.get(b"authorization"))
            if refusal:
                return refusal
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if kind != "application/json":
                return RequestError(f"Content-Type {kind or '(none)'!r} is not accepted: send the body as JSON with "
                                    "'Content-Type: application/json'", status=415, code="unsupported_media_type")
        return None

    def _key_refusal(self, authorization: Optional[bytes]) -> Optional[RequestError]:
        scheme, _, given = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return RequestError("no API key given: this server needs the header 'Authorization: Bearer KEY' with "
                                f"the key it was started with (--api-key or {KEY_ENV})", status=401,
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(given.strip(), self.key):  # constant time: no key guessing by timing
            return RequestError("incorrect API key in the Authorization header", status=401, code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None
