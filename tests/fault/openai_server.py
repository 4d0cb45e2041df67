"""A local OpenAI-compatible embeddings server for tests.

It serves ``POST /v1/embeddings`` over real HTTP on 127.0.0.1 with the
request, response and error formats of OpenAI's embeddings API
(https://developers.openai.com/api/reference/resources/embeddings). A test queues
scripted replies, such as an error status, a Retry-After header, a missing
vector or a vector of the wrong size, and the server sends them in order to
the next requests. It records every request it receives with its arrival
time and Authorization header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

DIMENSIONS = 384
MODEL = "test-embedding-384"
# OpenAI rejects an input array longer than this.
MAX_INPUTS = 2048

# Error type, code and default message for each status, modelled on the
# {"error": {"message", "type", "param", "code"}} bodies OpenAI sends.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "The request is invalid."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", None, "Not found."),
    408: ("server_error", None, "The request timed out."),
    409: ("server_error", None, "The request conflicted with another request."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: (
        "server_error",
        None,
        "The engine is currently overloaded, please try again later.",
    ),
}


def embedding_for(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """Return the unit vector the server sends for text, seeded by its sha256.

    A shorter dimensions value gives a prefix of the same random sequence,
    scaled to length 1, as OpenAI's shortened embeddings are.
    """
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(dimensions)
    return (vector / np.linalg.norm(vector)).tolist()


@dataclass(frozen=True)
class Reply:
    """One scripted response. The defaults give a correct embeddings response.

    A status of 400 or more sends an OpenAI error body. The other fields
    spoil a 200 response: missing_vectors drops vectors from the end of
    ``data``, dimensions sets the length of every vector, and first_value
    replaces the first number of the first vector (``nan`` is sent as the
    bare token ``NaN``, which Python's json module writes and reads). body
    replaces the whole response body.
    """

    status: int = 200
    retry_after: str | None = None
    message: str | None = None
    missing_vectors: int = 0
    dimensions: int | None = None
    first_value: float | None = None
    delay_seconds: float = 0.0
    body: bytes | None = None

    @classmethod
    def error(
        cls, status: int, *, retry_after: str | None = None, message: str | None = None
    ) -> Reply:
        """Build an error reply with OpenAI's type and code for status."""
        return cls(status=status, retry_after=retry_after, message=message)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, and the status it returned."""

    arrived_at: datetime
    arrived_monotonic: float
    method: str
    path: str
    authorization: str | None
    body: Any
    status: int

    @property
    def inputs(self) -> list[str]:
        """Texts of an embeddings request, always as a list."""
        if not isinstance(self.body, dict):
            return []
        value = self.body.get("input")
        return [value] if isinstance(value, str) else list(value or [])


class EmbeddingsServer:
    """A threaded HTTP server that serves ``/v1/embeddings`` from a script.

    Requests that fail authentication or validation get 401 or 400 and
    consume no scripted reply. Every other embeddings request takes
    the next reply from the script, or ``then`` once the script is empty.
    With echo_rejected_key set, a 401 message repeats the whole bearer
    token it rejected, as some proxies in front of embedding models do.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str = MODEL,
        echo_rejected_key: bool = False,
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.echo_rejected_key = echo_rejected_key
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._then = Reply()
        self._requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ------------------------------------------------------------

    def start(self) -> EmbeddingsServer:
        """Bind a free loopback port and serve from a background thread."""
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval makes stop() return quickly.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="embeddings-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> EmbeddingsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not running"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """Base URL to configure a client with; it posts to ``<base_url>/embeddings``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # Script and records ---------------------------------------------------

    def script(self, *replies: Reply, then: Reply | None = None) -> None:
        """Send replies to the next requests in order, and then once they run out."""
        with self._lock:
            self._script = deque(replies)
            self._then = then or Reply()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def embedding_requests(self) -> list[RecordedRequest]:
        """Requests to the embeddings endpoint, in arrival order."""
        return [
            request for request in self.requests if request.path == "/v1/embeddings"
        ]

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self._then

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    owner: EmbeddingsServer
    # Keep-alive, as httpx expects from an API server.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        # The test records requests itself; stderr stays quiet.
        return

    def do_GET(self) -> None:
        self._answer_without_script("GET")

    def do_POST(self) -> None:
        arrived_at = datetime.now(UTC)
        arrived_monotonic = time.monotonic()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        authorization = self.headers.get("Authorization")
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None

        def record(status: int) -> None:
            self.owner._record(
                RecordedRequest(
                    arrived_at,
                    arrived_monotonic,
                    "POST",
                    self.path,
                    authorization,
                    body,
                    status,
                )
            )

        if self.path != "/v1/embeddings":
            record(404)
            self._send_error(404, f"Invalid URL (POST {self.path})")
            return
        expected_key = self.owner.api_key
        if expected_key is not None and authorization != f"Bearer {expected_key}":
            record(401)
            message = None
            if self.owner.echo_rejected_key:
                token = (authorization or "").removeprefix("Bearer ")
                message = f"Invalid proxy server token passed. key={token} not found."
            self._send_error(401, message)
            return
        problem = _request_problem(body, raw)
        if problem is not None:
            record(400)
            self._send_error(400, problem)
            return
        reply = self.owner._next_reply()
        record(reply.status)
        if reply.delay_seconds:
            time.sleep(reply.delay_seconds)
        if reply.status >= 400:
            self._send_error(reply.status, reply.message, retry_after=reply.retry_after)
            return
        payload = reply.body or self._embeddings_body(body, reply)
        self._send(reply.status, payload, retry_after=reply.retry_after)

    def _answer_without_script(self, method: str) -> None:
        self.owner._record(
            RecordedRequest(
                datetime.now(UTC),
                time.monotonic(),
                method,
                self.path,
                self.headers.get("Authorization"),
                None,
                404,
            )
        )
        self._send_error(404, f"Invalid URL ({method} {self.path})")

    def _embeddings_body(self, request: dict[str, Any], reply: Reply) -> bytes:
        texts = (
            [request["input"]]
            if isinstance(request["input"], str)
            else request["input"]
        )
        size = reply.dimensions or request.get("dimensions") or DIMENSIONS
        vectors = [embedding_for(text, size) for text in texts]
        if reply.missing_vectors:
            vectors = vectors[: len(vectors) - reply.missing_vectors]
        if reply.first_value is not None and vectors:
            vectors[0][0] = reply.first_value
        base64_format = request.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _encode_base64(vector) if base64_format else vector,
            }
            for index, vector in enumerate(vectors)
        ]
        tokens = sum(len(text.split()) for text in texts)
        return json.dumps(
            {
                "object": "list",
                "data": data,
                "model": request["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        ).encode()

    def _send_error(
        self,
        status: int,
        message: str | None = None,
        *,
        retry_after: str | None = None,
    ) -> None:
        error_type, code, default_message = _ERRORS.get(
            status, ("server_error", None, "Unexpected error.")
        )
        body = {
            "error": {
                "message": message or default_message,
                "type": error_type,
                "param": None,
                "code": code,
            }
        }
        self._send(status, json.dumps(body).encode(), retry_after=retry_after)

    def _send(self, status: int, payload: bytes, *, retry_after: str | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(payload)


def _encode_base64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _request_problem(body: Any, raw: bytes) -> str | None:
    """Return why OpenAI would reject an embeddings request body, or None."""
    if not isinstance(body, dict):
        return (
            "We could not parse the JSON body of your request. The OpenAI API "
            f"expects a JSON payload; received {raw[:80]!r}."
        )
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or len(texts) > MAX_INPUTS:
        return f"'$.input' is invalid: send 1 to {MAX_INPUTS} strings"
    if not all(isinstance(text, str) and text for text in texts):
        return "'$.input' is invalid: every input must be a non-empty string"
    if body.get("encoding_format", "float") not in ("float", "base64"):
        return "'$.encoding_format' must be 'float' or 'base64'"
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or dimensions < 1
    ):
        return "'$.dimensions' must be a positive integer"
    return None
