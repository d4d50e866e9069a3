"""The node side of the Infernet control plane's v1 API, as the real control plane speaks it.

Every call is a signed POST (``identity.sign_request``) of compact JSON; replies are
``{"data": …}`` or ``{"error": "…"}`` with the HTTP status. Failures become
:class:`ControlPlaneError`, one line naming the URL: unreachable, timeouts, 5xx and answers
that aren't JSON are ``retryable``; a refused signature, a 4xx or an untrusted certificate is
not, because retrying without a human changes nothing.

Every call has an overall deadline (``timeout``, 15 s as the real node's client, or
``INFERNET_HTTP_TIMEOUT``) and reads at most 1 MiB of answer (``reconciler.httpsafe``): a
control plane that trickles or floods is an error like one that is down. A poll answered with
more commands than asked for runs the first ``limit`` only.

``httpx`` is imported when a client is built, so importing this module for ``specs_for`` stays
cheap.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from reconciler import limits
from reconciler.controlplane.args import command_of
from reconciler.controlplane.identity import AUTH_HEADER, NodeKey, sign_request
from reconciler.controlplane.specs import offline_body, specs_for
from reconciler.errors import ConfigError, InfernetError, one_line
from reconciler.model import ControlPlaneSettings
from reconciler.redact import redact

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "HeartbeatOutcome",
    "RemoteCommand",
    "offline_body",
    "specs_for",
]

log = logging.getLogger("infernet.controlplane")
DEADLINE = 15.0  # the real node's client timeout, for the whole call
_NODE_ID_TAKEN = "registered to a different pubkey"


class ControlPlaneError(InfernetError):
    """The control plane could not be reached or refused a call.

    ``status`` is the HTTP code when there was an answer; ``detail`` is the server's own
    ``{"error": …}`` text when the answer was the control plane's JSON. ``unsent`` is True when
    the request never left (no connection was made): the server can't have acted on it, which
    a lost answer (a timeout, a reset after sending) does not tell.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        retryable: bool,
        unsent: bool = False,
    ) -> None:
        self.status = status
        self.detail = detail
        self.retryable = retryable
        self.unsent = unsent
        super().__init__(message)


@dataclass(frozen=True)
class HeartbeatOutcome:
    """What a heartbeat did: the server's row id, and whether it had to register first."""

    row_id: str | None
    registered: bool = False


@dataclass(frozen=True)
class RemoteCommand:
    """A command claimed by ``poll_commands``; the server already marked it ``running``."""

    id: str
    command: str
    args: dict[str, Any]


class ControlPlane:
    """A signed-request client for one control plane and one node key; close it when done."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        key: NodeKey,
        *,
        timeout: float | None = None,
        ca_bundle: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        from reconciler import httpsafe  # with httpx: only a client needs it
        from reconciler.config.rules import (
            plain_http_problem,  # the file's rule, kept by the client
        )

        parts = urlsplit(settings.url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"control_plane.url {redact(settings.url)!r} is not an http:// or "
                "https:// URL; write it as https://host[:port]"
            )
        insecure = plain_http_problem(settings.url, insecure=settings.insecure)
        if insecure is not None:
            raise ConfigError(f"control_plane.url: {insecure}")
        self.settings = settings
        self.key = key
        self.timeout = httpsafe.default_deadline(DEADLINE) if timeout is None else timeout
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._ca_bundle = ca_bundle
        verify: ssl.SSLContext | bool = True  # httpx: certifi, or $SSL_CERT_FILE when set
        if ca_bundle is not None:
            try:
                verify = ssl.create_default_context(cafile=ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"CA bundle {ca_bundle} is unusable ({exc}); point ca_bundle at a PEM file"
                ) from exc
        if transport is not None:  # tests: a transport of their own
            self._http = httpx.Client(
                timeout=self.timeout, transport=transport, follow_redirects=False
            )
            return
        guard = httpsafe.Limits(deadline=self.timeout, max_body=limits.CONTROL_PLANE_BODY)
        self._http = httpsafe.client(
            guard,
            verify=verify,
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,  # a redirect would change the signed path
        )

    # the calls ------------------------------------------------------------------------------

    def heartbeat(self, body: dict[str, Any]) -> HeartbeatOutcome:
        """Beat; on 404 ("no row for this pubkey") register from this body and beat once more.

        An offline beat from a node that was never registered has nothing to mark, so it
        does not register.
        """
        body = {"role": self.settings.role, **body}
        try:
            data = self.post("/api/v1/node/heartbeat", body)
        except ControlPlaneError as exc:
            # Only the control plane's own JSON 404 means "register first"; an HTML 404 is a
            # wrong URL, and registering there would only fail the same way.
            if exc.status != 404 or exc.detail is None:
                raise
            if body.get("status") == "offline":
                return HeartbeatOutcome(None)
            self.register(self._register_body(body))
            data = self.post("/api/v1/node/heartbeat", body)
            return HeartbeatOutcome(_row_id(data), registered=True)
        return HeartbeatOutcome(_row_id(data))

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """Register (upsert on ``node_id``); the reply is ``{id, node_id}``."""
        data = self.post("/api/v1/node/register", {"role": self.settings.role, **body})
        return data if isinstance(data, dict) else {}

    def poll_commands(self, limit: int = limits.POLL_LIMIT) -> list[RemoteCommand]:
        """Claim up to ``limit`` pending commands (the server allows at most 10).

        A control plane that hands out more gets the first ``limit`` run and the rest ignored
        (it marked them running; its reaper fails them), so one answer can't make the node
        run an unbounded batch.
        """
        data = self.post("/api/v1/node/commands/poll", {"limit": limit})
        found = data.get("commands") if isinstance(data, dict) else None
        rows = found if isinstance(found, list) else []
        if len(rows) > limit:
            log.warning(
                "control plane %s handed out %d commands for a poll of at most %d; running the "
                "first %d and ignoring the rest",
                redact(self.url),
                len(rows),
                limit,
                limit,
            )
            rows = rows[: max(0, limit)]
        commands: list[RemoteCommand] = []
        for row in rows:
            # A row without an id can't be answered; one without args gets the default {}.
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                continue
            if not 0 < len(row["id"]) <= limits.MAX_COMMAND_ID or not row["id"].isprintable():
                log.warning(
                    "control plane %s sent a command id that is not one (%d characters);"
                    " ignoring it",
                    redact(self.url),
                    len(row["id"]),
                )
                continue
            verb, args = command_of(row)  # {id, command, args}, or the seed's flat shape
            commands.append(RemoteCommand(row["id"], verb[: limits.MAX_VERB], args))
        return commands

    def post_progress(self, command_id: str, progress: dict[str, Any]) -> str:
        """Report progress; returns the row status echoed back (``cancelled`` means stop)."""
        path = f"/api/v1/node/commands/{quote(command_id, safe='')}/progress"
        data = self.post(path, {"progress": progress})
        status = data.get("status") if isinstance(data, dict) else None
        return status if isinstance(status, str) else ""

    def complete(
        self,
        command_id: str,
        *,
        status: str,
        result: Any = None,
        error: str | None = None,
    ) -> str:
        """Finish a command as ``completed`` or ``failed``; returns the status the row now has.

        A command no longer ``running`` (e.g. cancelled) is left alone by the server, which
        answers with the status it already had.
        """
        if status not in ("completed", "failed"):
            raise ValueError(f"status must be 'completed' or 'failed', not {status!r}")
        body: dict[str, Any] = {"status": status}
        if result is not None:
            body["result"] = result
        if error is not None:
            body["error"] = error
        path = f"/api/v1/node/commands/{quote(command_id, safe='')}/complete"
        data = self.post(path, body)
        recorded = data.get("status") if isinstance(data, dict) else None
        return recorded if isinstance(recorded, str) else status

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # plumbing -------------------------------------------------------------------------------

    def _register_body(self, beat: dict[str, Any]) -> dict[str, Any]:
        """Register as the real node does: role, node_id, name, address/port, specs."""
        node_id = self.settings.node_id or socket.gethostname()
        body: dict[str, Any] = {"role": beat["role"], "node_id": node_id, "name": node_id}
        for name in ("address", "port", "specs"):
            if name in beat:
                body[name] = beat[name]
        gpus = body.get("specs", {}).get("gpus") if isinstance(body.get("specs"), dict) else None
        if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict) and gpus[0].get("model"):
            body["gpu_model"] = gpus[0]["model"]
        return body

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """Serialise once, sign those bytes and the path as sent, POST, and unwrap ``data``:
        the one signed call every route goes through."""
        import httpx

        from reconciler import httpsafe

        content = json.dumps(body, separators=(",", ":")).encode("ascii")
        request = self._http.build_request(
            "POST", self.url + path, content=content, headers={"content-type": "application/json"}
        )
        # Sign what goes on the wire: httpx may normalise the URL, so read the path back.
        wire_path = request.url.raw_path.decode("ascii")
        request.headers[AUTH_HEADER] = sign_request(self.key, "POST", wire_path, content)
        where = redact(self.url + path)
        try:
            response = self._http.send(request)  # the body too: under the deadline and cap
        except httpx.TimeoutException as exc:
            raise ControlPlaneError(
                f"control plane {where} did not answer within {self.timeout:g} s "
                f"({type(exc).__name__}); will retry",
                retryable=True,
                unsent=isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout),
            ) from exc
        except httpsafe.BodyRefused as exc:
            raise ControlPlaneError(
                f"control plane {where}: {exc}; will retry", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            raise self._transport_error(where, exc) from exc
        return _unwrap(where, response)

    def _transport_error(self, where: str, exc: Exception) -> ControlPlaneError:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(exc):
            reason = getattr(cause, "verify_message", None) or _line(str(exc))
            hint = (
                f"the CA bundle {self._ca_bundle} does not trust it; point ca_bundle at the CA "
                "that signed it"
                if self._ca_bundle
                else "if it uses a private CA, set the CA bundle option (ca_bundle) to its PEM file"
            )
            return ControlPlaneError(
                f"control plane {where}: TLS certificate not trusted ({reason}); {hint}",
                retryable=False,
            )
        if isinstance(cause, ssl.SSLError):
            return ControlPlaneError(
                f"control plane {where}: TLS handshake failed ({_line(str(cause))}); "
                "check that the URL's scheme and port match the server",
                retryable=True,
            )
        import httpx

        return ControlPlaneError(
            f"cannot reach the control plane at {where} ({type(exc).__name__}: "
            f"{_line(redact(str(exc))) or 'no detail'}); check control_plane.url and "
            "that it is up",
            retryable=True,
            unsent=isinstance(exc, httpx.ConnectError),
        )


def _unwrap(where: str, response: httpx.Response) -> Any:
    """``data`` of a 2xx JSON reply; every other answer becomes a one-line error."""
    status = response.status_code
    try:
        payload = response.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    detail = _line(str(error)) if error is not None else None
    said = f": {detail}" if detail else ""
    if status == 401:
        raise ControlPlaneError(
            "control plane refused the signature (401): check the node's clock (±60 s skew "
            f"allowed) and key ({where}{said})",
            status=401,
            detail=detail,
            retryable=False,
        )
    if status >= 500:
        # Only the control plane's own JSON error is quoted: a proxy's page is not repeated.
        raise ControlPlaneError(
            f"control plane {where} failed with HTTP {status}{said}; will retry",
            status=status,
            detail=detail,
            retryable=True,
        )
    if not isinstance(payload, dict):
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        if status == 404:
            raise ControlPlaneError(
                f"no Infernet control plane at {where} (HTTP 404, {kind}); check control_plane.url",
                status=404,
                retryable=False,
            )
        raise ControlPlaneError(
            f"control plane {where} answered HTTP {status} with {kind}, not JSON; is "
            "control_plane.url the control plane (not a proxy or login page)? will retry",
            status=status,
            retryable=True,
        )
    if status == 403 and detail and _NODE_ID_TAKEN in detail:
        raise ControlPlaneError(
            f"control plane refused {where} (HTTP 403{said}): another key already registered "
            "this node_id (the default node_id is the host name, so a cloned host collides). "
            "Give this node its own control_plane.node_id in infernet.yaml, or, if this is the "
            "same node with a new key, restore its old key_file",
            status=403,
            detail=detail,
            retryable=False,
        )
    if status >= 400:
        raise ControlPlaneError(
            f"control plane refused {where} (HTTP {status}{said})",
            status=status,
            detail=detail or "",
            retryable=False,
        )
    if status >= 300:
        raise ControlPlaneError(
            f"control plane {where} redirected (HTTP {status}); set control_plane.url to the "
            f"final address ({redact(response.headers.get('location', '?'))[:200]})",
            status=status,
            retryable=False,
        )
    return payload.get("data")


def _row_id(data: Any) -> str | None:
    row = data.get("id") if isinstance(data, dict) else None
    return str(row) if row is not None else None


def _line(text: str) -> str:
    """A server's text on one line and cut, so its HTML page can't flood the log."""
    return one_line(text, limits.PEER_TEXT)
