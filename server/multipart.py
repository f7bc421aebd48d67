"""multipart/form-data (RFC 7578) split in place: the body is already in memory, so each part is
found with `bytes.find` on the delimiter instead of a byte-at-a-time state machine.

Why not Starlette's `request.form()`: for the one-small-image requests that make up most of the
traffic, python-multipart's callback parser, the per-part SpooledTemporaryFile and the FormData
around it were about a quarter of the server's interpreter time per request (see server/README.md,
"Throughput per core"). Every upload is read whole into memory by the routes anyway (and the
body is capped by `max_body_bytes`), so nothing is lost by holding the body. Content-Disposition
parameters are still parsed by python-multipart's `parse_options_header` (quoting, RFC 2231).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

# The shapes every client library sends, read with one regex each; anything else (other parameter
# order, escapes, extra parameters) goes through parse_options_header, which gives the same values
# for these shapes (a profile put it at ~6% of a small request's interpreter time)
_SIMPLE_CONTENT_TYPE = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})", re.IGNORECASE)
_SIMPLE_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')


class MultipartError(ValueError):
    """A body that is not well-formed multipart/form-data (answered 400)."""


@dataclass(slots=True)
class Part:
    name: str
    filename: str | None  # None: a plain field, not a file
    data: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a `multipart/form-data; boundary=...` content type."""
    if simple := _SIMPLE_CONTENT_TYPE.fullmatch(content_type):
        return simple.group(1).encode("latin-1")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("the content type has no boundary parameter")
    if len(boundary) > 70:  # RFC 2046
        raise MultipartError("the boundary is longer than 70 characters")
    return boundary


def decode_text(raw: bytes) -> str:
    """A field's or parameter's bytes as text."""
    # as Starlette does: UTF-8, else Latin-1 (which never fails)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _part(headers: bytes, data: bytes) -> Part:
    disposition = None
    for line in headers.split(b"\r\n") if headers else ():
        name, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError(f"malformed part header {line[:60]!r}")
        if name.strip().lower() == b"content-disposition":
            disposition = value.strip()
    if disposition is None:
        raise MultipartError("a part has no Content-Disposition header")
    if simple := _SIMPLE_DISPOSITION.fullmatch(disposition):
        name, filename = simple.groups()
        return Part(decode_text(name), None if filename is None else decode_text(filename), data)
    _, options = parse_options_header(disposition)
    if b"name" not in options:
        raise MultipartError('the Content-Disposition header field "name" must be provided')
    filename = options.get(b"filename")
    return Part(decode_text(options[b"name"]), None if filename is None else decode_text(filename), data)


def iter_parts(body: bytes, boundary: bytes) -> Iterator[Part]:
    """The parts in order (preamble and epilogue ignored); raises MultipartError on a malformed body.
    A generator, so a caller can stop at a limit before the rest of a hostile body is split."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter  # between parts: CRLF belongs to the delimiter, not the content
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        first = body.find(separator)
        if first < 0:
            raise MultipartError("the body does not contain the boundary")
        pos = first + len(separator)
    while True:
        if body.startswith(b"--", pos):
            return  # the closing delimiter
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # only transport padding may follow a delimiter
            raise MultipartError("a boundary line is not followed by CRLF")
        if body.startswith(b"\r\n", eol + 2):
            headers, start = b"", eol + 4
        else:
            end_of_headers = body.find(b"\r\n\r\n", eol + 2)
            if end_of_headers < 0:
                raise MultipartError("the headers of a part do not end")
            headers, start = body[eol + 2 : end_of_headers], end_of_headers + 4
        end = body.find(separator, start)
        if end < 0:
            raise MultipartError("the body ends inside a part (no closing boundary)")
        yield _part(headers, body[start:end])
        pos = end + len(separator)
