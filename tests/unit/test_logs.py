"""Request ids and JSON log lines."""

from __future__ import annotations

import json
import logging

from gateway.logs import JsonFormatter, incoming_request_id, request_id


def test_a_plain_client_request_id_is_kept_and_anything_else_replaced() -> None:
    assert incoming_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "x" * 129, "with space", "new\nline", "é"):
        fresh = incoming_request_id(bad)
        assert fresh != bad and len(fresh) == 32 and int(fresh, 16) >= 0


def test_json_lines_carry_the_request_id_and_no_traceback() -> None:
    record = logging.LogRecord("gateway.app", logging.ERROR, __file__, 1, "failed on %d rows", (3,), None)
    token = request_id.set("req-7")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["message"] == "failed on 3 rows" and line["level"] == "ERROR" and line["request_id"] == "req-7"
    try:
        raise ValueError("a message that could hold anything")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["error"] == "ValueError" and "request_id" not in line
    assert "could hold" not in json.dumps(line)  # only the exception's type is logged
