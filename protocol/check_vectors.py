"""Checks the shared test vectors (protocol/vectors.json) with the `msgpack` package, as
the Python client of docs/PROTOCOL.md uses it: every frame's length prefix counts its
body, the body unpacks to the documented map, and packing that map (keys in the file's
order) gives the same bytes. Prints "ok" and exits 0 when all hold.

    python3 protocol/check_vectors.py [path/to/vectors.json]
"""
import json
import sys
from pathlib import Path

import msgpack


def to_wire(value):
    """The JSON form of a body as the values msgpack packs: {"bin": hex} is bytes."""
    if isinstance(value, dict):
        if list(value) == ["bin"]:
            return bytes.fromhex(value["bin"])
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    return value


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("vectors.json")
    vectors = json.loads(path.read_text())["vectors"]
    for v in vectors:
        frame = bytes.fromhex(v["frame"])
        length, body = int.from_bytes(frame[:4], "big"), frame[4:]
        assert length == len(body), f"{v['name']}: length {length}, body {len(body)} bytes"
        expected = to_wire(v["body"])
        decoded = msgpack.unpackb(body, raw=False)
        assert decoded == expected, f"{v['name']}: unpacked {decoded!r}, expected {expected!r}"
        packed = msgpack.packb(expected, use_bin_type=True)
        assert packed == body, f"{v['name']}: packed {packed.hex()}, expected {body.hex()}"
    print("ok")


if __name__ == "__main__":
    main()
