#!/usr/bin/env python3
"""A DiReDi gateway in plain Python: what a user would write instead of diredi-gateway.

This is the comparison point of the performance benchmark (`diredi-cloud-worker perf run`,
see BENCHMARKS.md). It is written the straightforward, idiomatic way on paho-mqtt,
onnxruntime and numpy from PyPI (versions pinned in bench/requirements.txt): one process,
one MQTT client, everything done in paho's message callback. It is not meant to be clever.

It speaks the same wire contract as the Rust gateway (README, "Topic contract"):

- in:  diredi/v1/{gw}/sensor/{sensor_id}   binary DRB1 frames, {"ts", "values"} JSON or SenML
- out: diredi/v1/{gw}/inference/{sensor_id} {"sensor", "ts", "label", "confidence",
       "probabilities", "model_version", "latency_ms", "window_id"}
- out: diredi/v1/{gw}/status (retained, "online"; "offline" as the last will)
- out: diredi/v1/{gw}/error   one message per rejected payload

Windowing follows the manifest: values are standardised with its mean/std, the first window
is emitted after `window` samples and then one every `stride` samples; a payload whose
timestamp goes backwards or leaves a gap of more than 5 sample periods empties the buffer.
A window's ts is the time of its last sample.

Model signatures are not verified (the sha256 of the ONNX file is): this gateway exists to be
measured, not deployed.

Usage: python bench/python_gateway.py --model onnx-models/hapt-student-v1.json \
           --host 127.0.0.1 --port 1883 --gateway-id bench
"""

import argparse
import hashlib
import json
import logging
import signal
import struct
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt

MAX_GAP_PERIODS = 5.0
BINARY_HEADER = struct.Struct("<4sHHq")

log = logging.getLogger("python-gateway")


class BadPayload(Exception):
    """A sensor payload that cannot be decoded; the message says why."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind = kind


def decode(payload, channels):
    """Returns (ts_ms or None, rows as a float32 array of shape (samples, C))."""
    if payload[:4] == b"DRB1":
        return decode_binary(payload, len(channels))
    text = payload.lstrip()
    if text[:1] == b"{":
        return decode_json(text, len(channels))
    if text[:1] == b"[":
        return decode_senml(text, channels)
    raise BadPayload("unknown_format", "expected DRB1 binary, a JSON object or a SenML array")


def decode_binary(payload, n_channels):
    if len(payload) < BINARY_HEADER.size:
        raise BadPayload("binary_truncated", "binary payload shorter than its header")
    _, channels, flags, ts = BINARY_HEADER.unpack_from(payload)
    if flags & ~1:
        raise BadPayload("binary_flags", f"unknown flags {flags:#x}")
    if channels != n_channels:
        raise BadPayload("channel_count", f"expected {n_channels} channels, found {channels}")
    body = memoryview(payload)[BINARY_HEADER.size:]
    if len(body) % (4 * channels):
        raise BadPayload("binary_length", "body is not a whole number of frames")
    rows = np.frombuffer(body, dtype="<f4").reshape(-1, channels)
    return (ts if flags & 1 else None), rows


def decode_json(text, n_channels):
    try:
        doc = json.loads(text)
        rows = np.asarray(doc["values"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise BadPayload("malformed_json", str(e)) from e
    if rows.ndim != 2 or rows.shape[1] != n_channels:
        raise BadPayload("channel_count", f"expected rows of {n_channels} values")
    ts = doc.get("ts")
    return (int(ts) if ts is not None else None), rows


def decode_senml(text, channels):
    try:
        records = json.loads(text)
        base_name, base_time = "", 0.0
        samples = {}
        for r in records:
            base_name = r.get("bn", base_name)
            base_time = r.get("bt", base_time)
            name = r.get("n", "")
            channel = name if name in channels else base_name + name
            t = base_time + r.get("t", 0.0)
            samples.setdefault(t, {})[channel] = float(r["v"])
        times = sorted(samples)
        rows = np.array([[samples[t][c] for c in channels] for t in times], dtype=np.float32)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadPayload("malformed_senml", str(e)) from e
    ts = round(times[0] * 1000.0) if times and times[0] >= 2**28 else None
    return ts, rows


class SensorWindow:
    """The last `window` standardised samples of one sensor."""

    def __init__(self, window, stride, period_ms):
        self.window, self.stride, self.period_ms = window, stride, period_ms
        self.buffer = None  # (samples, C), standardised
        self.start_ts = 0.0  # time of buffer[0]
        self.last_ts = None  # time of the last sample received
        self.next_index = 0

    def push(self, ts, rows, now_ms):
        """Adds rows and returns the completed windows as (index, end_ts_ms, (C, T) array)."""
        period = self.period_ms
        if ts is None:
            first = self.last_ts + period if self.last_ts is not None else now_ms - (len(rows) - 1) * period
        else:
            first = float(ts)
            if self.last_ts is not None and (
                first <= self.last_ts or first - (self.last_ts + period) > MAX_GAP_PERIODS * period
            ):
                self.buffer = None
        if self.buffer is None or len(self.buffer) == 0:
            self.buffer, self.start_ts = rows, first
        else:
            self.buffer = np.concatenate([self.buffer, rows])
        self.last_ts = first + (len(rows) - 1) * period

        windows = []
        while len(self.buffer) >= self.window:
            end_ts = round(self.start_ts + (self.window - 1) * period)
            windows.append((self.next_index, end_ts, self.buffer[: self.window].T))
            self.next_index += 1
            self.buffer = self.buffer[self.stride :]
            self.start_ts += self.stride * period
        return windows


class Gateway:
    def __init__(self, args):
        manifest_path = Path(args.model)
        self.manifest = json.loads(manifest_path.read_text())
        onnx_path = manifest_path.parent / self.manifest["onnx_file"]
        onnx_bytes = onnx_path.read_bytes()
        if hashlib.sha256(onnx_bytes).hexdigest() != self.manifest["sha256"]:
            raise SystemExit(f"{onnx_path}: sha256 does not match the manifest")
        inp = self.manifest["input"]
        self.channels = inp["channels"]
        self.window, self.stride = inp["window"], inp["stride"]
        self.period_ms = 1000.0 / inp["sample_rate_hz"]
        self.mean = np.array(inp["mean"], dtype=np.float32)
        self.std = np.array(inp["std"], dtype=np.float32)
        self.classes = self.manifest["classes"]
        self.version = self.manifest["version"]

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = inp["name"]
        self.output_name = self.manifest["output"]["name"]

        self.prefix = f"diredi/v1/{args.gateway_id}"
        self.gateway_id = args.gateway_id
        self.sensors = {}
        self.started_at = int(time.time() * 1000)

        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"diredi-python-gateway-{args.gateway_id}"
        )
        self.client.will_set(f"{self.prefix}/status", json.dumps(self.status("offline")), qos=1, retain=True)
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message
        self.client.connect(args.host, args.port, keepalive=30)

    def status(self, state):
        return {
            "state": state,
            "gateway_id": self.gateway_id,
            "model_id": self.manifest["model_id"],
            "model_version": self.version,
            "execution_provider": "cpu",
            "version": "python-" + ort.__version__,
            "started_at": self.started_at,
        }

    def on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe(f"{self.prefix}/sensor/+", qos=0)
        client.publish(f"{self.prefix}/status", json.dumps(self.status("online")), qos=1, retain=True)
        log.info("Online on %s with %s v%s", self.prefix, self.manifest["model_id"], self.version)

    def on_message(self, client, userdata, msg):
        received = time.perf_counter()
        sensor = msg.topic.rsplit("/", 1)[-1]
        try:
            ts, rows = decode(msg.payload, self.channels)
            if len(rows) == 0:
                raise BadPayload("empty", "payload holds no sample")
            if not np.isfinite(rows).all():
                raise BadPayload("non_finite", "a value is not a finite number")
        except BadPayload as e:
            error = {"topic": msg.topic, "sensor": sensor, "reason": str(e), "kind": e.kind,
                     "ts": int(time.time() * 1000)}
            client.publish(f"{self.prefix}/error", json.dumps(error))
            return
        standardised = (rows - self.mean) / self.std
        window = self.sensors.get(sensor)
        if window is None:
            window = self.sensors[sensor] = SensorWindow(self.window, self.stride, self.period_ms)
        for index, end_ts, x in window.push(ts, standardised, time.time() * 1000.0):
            probabilities = self.session.run([self.output_name], {self.input_name: x[np.newaxis]})[0][0]
            best = int(np.argmax(probabilities))
            result = {
                "sensor": sensor,
                "ts": end_ts,
                "label": self.classes[best],
                "confidence": float(probabilities[best]),
                "probabilities": {c: float(p) for c, p in zip(self.classes, probabilities)},
                "model_version": self.version,
                "latency_ms": (time.perf_counter() - received) * 1000.0,
                "window_id": f"{sensor}:{index}",
            }
            client.publish(f"{self.prefix}/inference/{sensor}", json.dumps(result))

    def run(self):
        def stop(signum, frame):
            self.client.publish(f"{self.prefix}/status", json.dumps(self.status("offline")), qos=1, retain=True)
            self.client.disconnect()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.client.loop_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="onnx-models/hapt-student-v1.json", help="model manifest")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--gateway-id", default="python")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Gateway(args).run()


if __name__ == "__main__":
    main()
