"""Child process that parses one untrusted file under resource limits.

The parse worker starts this module with ``python -m`` ahead of need, writes
a JSON request to its stdin and reads a JSON result from its stdout. A
crash, a runaway allocation or an endless loop in a parser kills only this
process.

Request: ``{"path", "content_type", "password", "cpu_seconds", "memory_bytes",
"max_pages", "max_chars"}``.
Result: ``{"ok": true, "markdown", "page_count", "page_offsets", "encoding"}``
or ``{"ok": false, "code", "message"}``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

_MEMORY_MESSAGE = (
    "parsing needed more memory than INGESTD_PARSE_MEMORY_LIMIT_BYTES ({limit} bytes) "
    "allows; split the document or raise the limit"
)


def _apply_limits(cpu_seconds: int, memory_bytes: int) -> None:
    # RLIMIT_CPU sends SIGXCPU at the soft limit; RLIMIT_AS makes allocations
    # beyond the limit fail with MemoryError instead of exhausting the host.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _parse(request: dict) -> dict:
    from services.gateway.parsing import ParseError, ParseLimits, parse_document

    limits = ParseLimits(
        max_pages=int(request["max_pages"]), max_chars=int(request["max_chars"])
    )
    try:
        data = Path(request["path"]).read_bytes()
        parsed = parse_document(
            data,
            request["content_type"],
            password=request.get("password") or None,
            limits=limits,
        )
    except ParseError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message}
    return {
        "ok": True,
        "markdown": parsed.markdown,
        "page_count": parsed.page_count,
        "page_offsets": parsed.page_offsets,
        "encoding": parsed.encoding,
    }


def main() -> None:
    # The parser is imported before the request arrives: the parse worker
    # starts the next child ahead of the next document, so the imports
    # (about 0.2 s of CPU, numpy among them) are off the document's critical
    # path. The limits still apply to all parsing of the untrusted file.
    import services.gateway.parsing  # noqa: F401

    request = json.loads(sys.stdin.read())
    memory_bytes = int(request["memory_bytes"])
    _apply_limits(int(request["cpu_seconds"]), memory_bytes)
    try:
        result = _parse(request)
    except MemoryError:
        result = {
            "ok": False,
            "code": "limit_exceeded",
            "message": _MEMORY_MESSAGE.format(limit=memory_bytes),
        }
    sys.stdout.write(json.dumps(result, ensure_ascii=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
    # The result is written and flushed. Skipping the interpreter's shutdown,
    # which took about 30 ms with numpy loaded on the benchmark machine, ends
    # the process at once, and with it the parse worker's wait.
    sys.stderr.flush()
    os._exit(0)
