"""An embedding backend that calls an OpenAI-compatible ``/embeddings`` endpoint.

It speaks the request and response format of OpenAI's embeddings API, which
many servers also serve (vLLM, text-embeddings-inference, Ollama, LiteLLM).
Each call is one HTTP request, and the backend does not retry on its own.
A failure becomes a TransientError or a PermanentError, so the embed worker's
job-level retry policy decides what happens next. That policy honours the
server's ``Retry-After`` and resumes the job from its last stored batch.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from services.embedder.backends import PriorityLock
from shared.errors import PermanentError, TransientError

# 408 and 409 are worth a retry by HTTP's own definitions, 429 means slow
# down, and 5xx is the server's trouble. Any other 4xx means the request
# itself is wrong, so resending it cannot help.
_RETRYABLE_STATUS = frozenset({408, 409, 429})

# Maximum wait taken from a Retry-After header. A job waits out the whole
# delay without a lease and without failing, so a server that requests
# years would park it that long. A wait past PostgreSQL's interval range
# makes scheduling the retry fail, and the job is then claimed again when
# its lease expires, sooner than the server asked.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for, or None.

    The header holds either a number of seconds or an HTTP date (RFC 9110,
    section 10.2.3). A date in the past gives 0.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            # A year too large for a C long raises OverflowError.
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
        return max(0.0, (when - current).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


class OpenAICompatibleBackend:
    """Embeds texts with a remote OpenAI-compatible embeddings API."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        dimensions: int,
        max_tokens: int,
        api_key: str | None = None,
        timeout_seconds: float = 30.0,
        send_dimensions: bool = True,
        revision: str = "1",
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._api_key = api_key
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds),
        )
        self._url = base_url
        self._model = model
        self._send_dimensions = send_dimensions
        # One request at a time keeps a search query from waiting behind
        # several ingestion batches in the remote server's queue.
        self._lock = PriorityLock()
        self.embed_model = model
        self.dimensions = dimensions
        self.max_tokens = max_tokens
        # The remote model's weights cannot be checked from here, so the
        # version is the operator's revision label plus the vector shape.
        self.embed_version = f"api-r{revision}-{dimensions}d-unit"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def embed(self, texts: list[str], *, urgent: bool = False) -> np.ndarray:
        body: dict[str, Any] = {
            "model": self._model,
            "input": texts,
            "encoding_format": "float",
        }
        if self._send_dimensions:
            body["dimensions"] = self.dimensions
        with self._lock.hold(urgent=urgent):
            try:
                response = self._client.post("embeddings", json=body)
            except httpx.TimeoutException as exc:
                raise TransientError(
                    "embedding_api_timeout",
                    f"embedding API at {self._url} did not answer in time: {exc}",
                ) from exc
            except httpx.TransportError as exc:
                raise TransientError(
                    "embedding_api_unreachable",
                    f"cannot reach the embedding API at {self._url}: {exc}",
                ) from exc
        self._raise_for_status(response)
        return self._vectors(response, len(texts))

    def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        detail = response.text
        if self._api_key:
            # Some servers echo the key they rejected, and detail goes into
            # logs and the job's last_error. Redacting before truncating
            # leaves no partial key behind.
            detail = detail.replace(self._api_key, "[redacted]")
        detail = detail[:300].strip()
        if status in _RETRYABLE_STATUS or status >= 500:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                wait = min(wait, MAX_RETRY_AFTER_SECONDS)
            raise TransientError(
                "embedding_rate_limited" if status == 429 else "embedding_api_error",
                f"embedding API returned HTTP {status}: {detail}",
                retry_after_seconds=wait,
            )
        hint = (
            "check INGESTD_EMBED_API_KEY"
            if status in (401, 403)
            else "check INGESTD_EMBED_API_URL and INGESTD_EMBED_API_MODEL, then call RetryJob"
        )
        raise PermanentError(
            "embedding_request_rejected",
            f"embedding API rejected the request with HTTP {status}: {detail}; {hint}",
        )

    def _vectors(self, response: httpx.Response, expected: int) -> np.ndarray:
        try:
            items = response.json()["data"]
            ordered = sorted(items, key=lambda item: int(item["index"]))
            rows = [item["embedding"] for item in ordered]
            indexes = [int(item["index"]) for item in ordered]
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientError(
                "invalid_embedding",
                f"embedding API returned a body that is not an embeddings list: {exc}",
            ) from exc
        if indexes != list(range(len(indexes))) or len(rows) != expected:
            raise TransientError(
                "invalid_embedding",
                f"embedding API returned {len(rows)} vectors with indexes "
                f"{indexes[:10]} for {expected} texts",
            )
        try:
            vectors = np.asarray(rows, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise TransientError(
                "invalid_embedding",
                f"embedding API returned vectors of unequal length or non-numbers: {exc}",
            ) from exc
        if vectors.ndim != 2 or vectors.shape[1] != self.dimensions:
            raise TransientError(
                "invalid_embedding",
                f"embedding API returned vectors of shape {vectors.shape}; expected "
                f"{self.dimensions} dimensions, so set INGESTD_EMBED_API_DIMENSIONS "
                "to what the model produces",
            )
        if not np.isfinite(vectors).all():
            raise TransientError(
                "invalid_embedding", "embedding API returned NaN or infinity"
            )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise TransientError(
                "invalid_embedding", "embedding API returned an all-zero vector"
            )
        # Providers differ on normalization, and search ranks by cosine
        # distance on unit vectors, so every vector is scaled to length 1.
        return vectors / norms
