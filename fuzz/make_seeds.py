#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into corpus/<target>/seed-*.

The committed corpora grew from these seeds under libFuzzer and were minimised with
`cargo fuzz cmin`; run this again only to start over (needs Python 3 and, for the signed
manifest seeds, the `cryptography` package). The formats are those of protocol/src and
learn/src/knowledge.rs; see the fuzz targets for the configuration byte in front of the
sensor and knowledge inputs.
"""

import hashlib
import json
import random
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# Must match fuzz_targets/manifest.rs.
FUZZ_ONNX = b"\x08\x07diredi fuzz onnx"
FUZZ_KEY_SEED = bytes([7] * 32)


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def sensors():
    # Configuration byte: bits 0-2 = channels - 1, bit 6 = names "dev/ch{i}", bit 7 = limit 4.
    json_seeds = {
        "rows": (2, '{"ts": 1700000000123, "values": [[1, 2.5, -3], [4e2, 5, 6]]}'),
        "no-ts": (1, '{"values": [[1, 2]], "unit": "g", "ts": null}'),
        "too-many": (0x80, '{"values": [[1],[2],[3],[4],[5]]}'),
        "short-row": (2, '{"values": [[1, 2, 3], [1, 2]]}'),
        "overflow": (1, '{"values": [[1, 2], [3, 1e39]]}'),
        "dup": (1, '{"values": [[1, 2]], "values": [[1, 2]]}'),
        "empty": (1, '{"values": []}'),
        "neg-zero": (0, '{"ts": -5, "values": [[-0.0], [1.17549435e-38], [3.4028235e38]]}'),
    }
    for name, (cfg, text) in json_seeds.items():
        write("sensor_json", name, bytes([cfg]) + text.encode())

    senml_seeds = {
        "pack": (1, """[
            {"bn": "urn:dev:imu0:", "bt": 1.7e9, "n": "ch1", "u": "m/s2", "v": 2},
            {"n": "ch0", "v": 1},
            {"n": "ch1", "t": 0.02, "v": 4},
            {"n": "ch0", "t": 0.02, "v": 3, "bver": 10}
        ]"""),
        "base-name": (0x41, '[{"bn": "dev/", "bv": 10, "n": "ch0", "v": 1}, {"n": "ch1", "v": 2}]'),
        "encoded": (0x41, '[{"bn":"dev/","bt":1700000000.0,"n":"dev/ch0","v":1.0},'
                          '{"n":"dev/ch1","v":2.0},{"n":"dev/ch0","t":0.02,"v":3.0},'
                          '{"n":"dev/ch1","t":0.02,"v":4.0}]'),
        "must-understand": (0, '[{"n": "ch0", "v": 1, "foo_": 1}]'),
        "string-value": (0, '[{"n": "ch0", "vs": "x"}, {"n": "ch0", "vb": true}]'),
        "time-order": (1, '[{"n": "ch0", "v": 1}, {"n": "ch1", "v": 2}, {"n": "ch0", "t": -1, "v": 1}]'),
        "missing": (1, '[{"n": "ch0", "v": 1}, {"n": "ch1", "t": 1, "v": 2}]'),
        "escaped": (0, '[{"bn": "d\\u0065v/", "n": "ch\\u0030", "v": 1e300}]'),
        "too-many": (0x80, '[' + ','.join(f'{{"n":"ch0","t":{i},"v":{i}}}' for i in range(6)) + ']'),
    }
    for name, (cfg, text) in senml_seeds.items():
        write("sensor_senml", name, bytes([cfg]) + text.encode())

    def frames(channels, flags, ts, values):
        body = struct.pack("<HHq", channels, flags, ts)
        return body + b"".join(struct.pack("<f", v) for v in values)

    write("sensor_binary", "ts", bytes([2]) + frames(3, 1, 1700000000123, [1, -2, 3.5, 4, 5, 6]))
    write("sensor_binary", "no-ts", bytes([0]) + frames(1, 0, 0, [0.5, 1.5, 2.5]))
    write("sensor_binary", "nan", bytes([1]) + frames(2, 1, -1, [1.0, float("nan")]))
    write("sensor_binary", "flags", bytes([1]) + frames(2, 2, 0, [1.0, 2.0]))
    write("sensor_binary", "too-many", bytes([0x80]) + frames(1, 0, 0, [1, 2, 3, 4, 5]))
    write("sensor_binary", "short", bytes([0]) + frames(1, 0, 0, [1])[:-1])


def messages():
    labels = {
        "range": '{"from_ts": 1, "to_ts": 2, "class": "walk"}',
        "window": '{"window_id": "imu0:3", "class": "sit"}',
        "empty-range": '{"from_ts": 3, "to_ts": 2, "class": "walk"}',
        "both": '{"window_id": "a", "from_ts": 1, "to_ts": 2, "class": "x"}',
        "unknown-key": '{"window_id": "a", "class": "x", "note": 1}',
        "escaped": '{"window_id": "\\ud83d\\ude00", "class": "\\u0000"}',
    }
    for name, text in labels.items():
        write("label", name, text)
    commands = {
        "adapt": '{"cmd": "adapt"}',
        "rollback": '{"cmd": "rollback", "to_version": 4}',
        "rollback-null": '{"cmd": "rollback", "to_version": null}',
        "unknown": '{"cmd": "format_disk"}',
        "ack": '{"package_id": "ab12", "accepted": true, "detail": "updating"}',
        "ack-refused": '{"package_id": "ab12", "accepted": false}',
    }
    for name, text in commands.items():
        write("command", name, text)


def dispatch():
    onnx = bytes(i % 251 for i in range(10))

    def spec(name, data, chunk_size):
        parts = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
        return {"name": name, "size": len(data), "sha256": sha(data),
                "chunk_size": chunk_size, "chunks": [sha(p) for p in parts]}

    msg = {"format": "diredi-dispatch/1", "manifest": {"version": 2, "onnx_file": "m-v2.onnx"},
           "version": 2, "files": [spec("m-v2.onnx", onnx, 4), spec("m-v2.probe", b"", 4)]}
    write("dispatch_msg", "two-files", json.dumps(msg))
    msg["files"][0]["name"] = "../m.onnx"
    write("dispatch_msg", "bad-name", json.dumps(msg))
    one = {"format": "diredi-dispatch/1", "manifest": None, "version": 18446744073709551615,
           "files": [spec("a", b"abc", 1)]}
    write("dispatch_msg", "one-file", json.dumps(one))
    # dispatch_chunks decodes its input with `arbitrary`: any bytes are a valid start.
    rng = random.Random(6)
    for n in (16, 64, 256, 1024):
        write("dispatch_chunks", f"random-{n}", bytes(rng.randrange(256) for _ in range(n)))


def manifests():
    base = {
        "format": "diredi-manifest/1",
        "model_id": "fuzz-student",
        "version": 2,
        "parent_version": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "onnx_file": "fuzz-student-v2.onnx",
        "sha256": sha(FUZZ_ONNX),
        "input": {"name": "input", "layout": "NCT", "channels": ["ax", "ay"],
                  "window": 8, "stride": 4, "sample_rate_hz": 50.0,
                  "mean": [0.25, -1.5], "std": [2.0, 0.125]},
        "output": {"name": "probabilities", "kind": "probabilities"},
        "classes": ["walk", "sit", "lie"],
        "params": 123,
        "metrics": {"presumed_test": {"accuracy": 0.75}},
    }
    write("manifest", "unsigned", json.dumps(base, indent=1))
    probe = dict(base, probe={"file": "fuzz-student-v2.probe", "sha256": sha(b"probe")},
                 future_field=[1, {"b": None}])
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    except ImportError:
        print("cryptography is not installed: no signed manifest seeds")
        return
    key = Ed25519PrivateKey.from_private_bytes(FUZZ_KEY_SEED)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = hashlib.sha256(public).hexdigest()[:16]
    import base64
    for name, m in (("signed", base), ("signed-probe", probe)):
        # serde_json's compact form with sorted keys; the numbers above print alike in both.
        canonical = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
        msg = b"diredi-manifest-v1\0" + canonical + b"\0" + hashlib.sha256(FUZZ_ONNX).digest()
        sig = base64.b64encode(key.sign(msg)).decode()
        signed = dict(m, signature={"alg": "ed25519", "key_id": key_id, "value": sig})
        write("manifest", name, json.dumps(signed, indent=1))


def knowledge():
    def s(text):
        b = text.encode()
        return struct.pack("<H", len(b)) + b

    def tensor(name, shape, bits, values, mask=None):
        rows = shape[0] if len(shape) > 1 else 1
        out = s(name) + struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
        out += struct.pack("<BBI", bits, 1 if mask else 0, rows)
        out += b"".join(struct.pack("<f", 0.01 * (r + 1)) for r in range(rows))
        if mask:
            out += bytes(mask)
        if bits == 8:
            out += bytes(v & 0xFF for v in values)
        else:
            vals = values + [0] * (len(values) % 2)
            out += bytes((vals[i] & 0x0F) | ((vals[i + 1] & 0x0F) << 4) for i in range(0, len(vals), 2))
        return out

    classes = ["walk", "sit", "lie", "downstairs"]
    body = s("fuzz-student") + struct.pack("<Q", 1) + s("0" * 64)
    body += struct.pack("<H", len(classes)) + b"".join(s(c) for c in classes)
    body += struct.pack("<H", 3) + b"".join(struct.pack("<I", h) for h in (0, 5, 0, 7))
    tensors = [
        tensor("conv0.bias", [4], 8, [1, -2, 3, -127]),
        tensor("conv0.weight", [4, 2, 3], 4, [(i % 15) - 7 for i in range(24)]),
        tensor("head.weight", [4, 4], 8, [5, -5, 7], mask=[0b10000001, 0b00000100]),
    ]
    body += struct.pack("<H", len(tensors)) + b"".join(tensors)
    header = b"DRKN" + struct.pack("<HI", 1, len(body))
    package = header + body + hashlib.sha256(header + body).digest()
    write("knowledge", "raw", b"\x00" + package)
    write("knowledge", "framed", b"\x01" + body)
    write("knowledge", "raw-truncated", b"\x00" + package[:40])
    # Mode 2: knobs (new classes, bits, sparsity), then parameter changes.
    rng = random.Random(2)
    for knobs in (0x00, 0x05, 0x3A, 0xFF):
        write("knowledge", f"adapt-{knobs:02x}", bytes([2, knobs]) + bytes(rng.randrange(256) for _ in range(96)))


if __name__ == "__main__":
    sensors()
    messages()
    dispatch()
    manifests()
    knowledge()
