"""Child process that parses one untrusted file under resource limits.

The parse worker starts this module with ``python -m`` ahead of need, writes
a JSON request to its stdin and reads a JSON result from its stdout. A crash, a runaway
allocation or an endless loop in a parser kills only this process.

Request: ``{"path", "content_type", "password", "cpu_seconds", "memory_bytes"}``.
Result: ``{"ok": true, "markdown", "page_count", "page_offsets", "encoding"}``
or ``{"ok": false, "code", "message"}``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _apply_limits(cpu_seconds: int, memory_bytes: int) -> None:
    # RLIMIT_CPU sends SIGXCPU at the soft limit; RLIMIT_AS makes allocations
    # beyond the limit fail with MemoryError instead of exhausting the host.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def main() -> None:
    # The parser is imported before the request arrives: the parse worker
    # starts the next child ahead of the next document, so the imports
    # (about 0.2 s of CPU, numpy among them) are off the document's critical
    # path. The limits still apply to all parsing of the untrusted file.
    from services.gateway.parsing import ParseError, parse_document

    request = json.loads(sys.stdin.read())
    _apply_limits(int(request["cpu_seconds"]), int(request["memory_bytes"]))

    try:
        data = Path(request["path"]).read_bytes()
        parsed = parse_document(
            data, request["content_type"], password=request.get("password") or None
        )
        result = {
            "ok": True,
            "markdown": parsed.markdown,
            "page_count": parsed.page_count,
            "page_offsets": parsed.page_offsets,
            "encoding": parsed.encoding,
        }
    except ParseError as exc:
        result = {"ok": False, "code": exc.code, "message": exc.message}
    except MemoryError:
        result = {
            "ok": False,
            "code": "limit_exceeded",
            "message": "parsing needed more memory than INGESTD_PARSE_MEMORY_LIMIT_BYTES allows",
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
