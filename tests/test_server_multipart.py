"""server/multipart.py against the parser it replaces (Starlette's, over python-multipart): the same
parts for what clients send and for hand-written bodies (preamble, epilogue, padding, CRLF and
dashes inside the data, other header orders); malformed bodies raise MultipartError."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from server.multipart import MultipartError, boundary_of, iter_parts


def _ours(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    return [(p.name, p.filename, p.data) for p in iter_parts(body, boundary_of(content_type))]


def _starlette(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    async def run() -> list[tuple[str, str | None, bytes]]:
        async def stream():  # noqa: ANN202
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type}), stream(),
                                     max_files=1000, max_fields=1000).parse()
        out = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, await value.read()))
            else:
                out.append((name, None, value.encode()))
        return out

    return asyncio.run(run())


def _encoded(files: list, data: dict[str, str]) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_what_clients_send_parses_as_starlette_parses_it() -> None:
    rng = random.Random(0)
    tricky = b"\r\n--\r\n\r\n--boundary\r\n" + bytes(range(256))
    cases = [
        ([("files", ("q.jpg", b"\xff\xd8" + rng.randbytes(900)))], {}),
        ([("file", ("a.png", tricky)), ("file", ("b.png", b""))], {"k": "10", "metadata": '{"caf\u00e9": "\u2603"}'}),
        ([("files", ("na\u00efve photo.jpg", rng.randbytes(5000)))], {"empty": ""}),
        ([("files", (f"{i}.jpg", rng.randbytes(rng.randrange(1, 3000)))) for i in range(8)], {}),
    ]
    for files, data in cases:
        content_type, body = _encoded(files, data)
        ours = _ours(content_type, body)
        assert ours == _starlette(content_type, body)
        assert len(ours) == len(files) + len(data)


def test_hand_written_bodies() -> None:
    ct = "multipart/form-data; boundary=XyZ"
    body = (b"--XyZ\r\n"
            b'content-type: image/jpeg\r\nCONTENT-DISPOSITION: form-data; filename="x.jpg"; name="files"\r\n\r\n'
            b"--XyZ\r\n\r\n-XyZ\r\n"  # looks like a boundary, is data (the delimiter is CRLF + "--XyZ")
            b'\r\n--XyZ\r\nContent-Disposition: form-data; name="k"\r\n\r\n5'
            b"\r\n--XyZ--\r\nepilogue to ignore")
    assert _ours(ct, body) == _starlette(ct, body)
    assert _ours(ct, body) == [("files", "x.jpg", b"--XyZ\r\n\r\n-XyZ\r\n"), ("k", None, b"5")]
    # RFC 2046 also allows a preamble and spaces after a boundary (python-multipart refuses both)
    padded = b"preamble to ignore\r\n--XyZ \t" + body[len(b"--XyZ"):]
    assert _ours(ct, padded) == _ours(ct, body)
    # a quoted boundary and escapes in the parameters go through parse_options_header
    ct = 'multipart/form-data; charset=utf-8; boundary="a b"'
    body = (b'--a b\r\nContent-Disposition: form-data; name="files"; filename="say \\"hi\\".jpg"\r\n\r\n'
            b"data\r\n--a b--\r\n")
    assert _ours(ct, body) == _starlette(ct, body) == [("files", 'say "hi".jpg', b"data")]


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"--x\r\n\r\n--x--"),  # no boundary parameter
    ("multipart/form-data; boundary=x", b"no boundary anywhere"),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nunterminated'),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Type: text/plain\r\n\r\ndata\r\n--x--"),  # no disposition
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; filename="a"\r\n\r\nd\r\n--x--'),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"'),  # headers never end
    ("multipart/form-data; boundary=x", b'--xjunk\r\nContent-Disposition: form-data; name="a"\r\n\r\nd\r\n--x--'),
    ("multipart/form-data; boundary=" + "b" * 71, b""),
])
def test_malformed_bodies_raise(content_type: str, body: bytes) -> None:
    with pytest.raises(MultipartError):
        _ours(content_type, body)
