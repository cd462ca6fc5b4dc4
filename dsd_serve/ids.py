"""Identifiers at the edge of both transports: checked before anything echoes them into a header, a status or a log.

- request id: the client's `X-Request-ID` / `x-request-id` when it is a short token, else one made here; it
  correlates logs and responses and is never written into an image;
- job id: what the job routes and rpcs take; anything that cannot be one is refused as not found, quoting at most
  `QUOTED_CHARS` of it.
"""

from __future__ import annotations

import re
import uuid

from .job_store import JOB_ID
from .jobs import JobNotFound

REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
QUOTED_CHARS = 40
"""Longest part of a refused value an error message repeats: enough to recognise it, never a header over limits."""


def request_id(supplied: str | None) -> str:
    """The client's request id when it is 1-64 characters of `A-Za-z0-9._-`, else a new one."""
    if supplied and REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex


def quoted(value: str) -> str:
    """`value` as an error message may repeat it: its first `QUOTED_CHARS` characters, escaped to printable ASCII."""
    text = value[:QUOTED_CHARS].encode("unicode_escape").decode("ascii")
    return f"'{text}'" + (f"... ({len(value)} characters)" if len(value) > QUOTED_CHARS else "")


def check_job_id(job_id: str) -> str:
    """`job_id` when it has the form of one (28 lowercase hexadecimal digits), else `JobNotFound`."""
    if not JOB_ID.fullmatch(job_id):
        raise JobNotFound(f"{quoted(job_id)} is not a job id (28 hexadecimal digits)")
    return job_id
