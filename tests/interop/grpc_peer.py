"""Python grpcio (C-core) as a peer of dlb in the conformance tests: a client, or an instance.

client: reads {"target": "HOST:PORT", "cases": [...]} as JSON on stdin (with "tls": {"ca",
        "cert", "key"} (PEM file paths) it calls over mutual TLS), makes each call with
        raw bytes (no generated code: the test encodes and decodes the protobuf), and prints one
        JSON object per case on stdout. A case: name, method (a path), request (hex),
        metadata ([[key, value]], a -bin value in hex), timeout_ms, compression ("gzip"),
        cancel_after_ms. A result: name, code (a name such as "INVALID_ARGUMENT"), message,
        response (hex), initial and trailing metadata ([[key, value]], -bin values in hex).
server: an instance of dlb.v1.Operations written in another stack, for the gateway to balance
        over. It serves grpc.health.v1 and, for every Operations method, echoes the request
        message; request metadata x-echo-* comes back as initial metadata, what is left of the
        call's deadline as trailing metadata x-time-remaining-ms, and x-want-code,
        x-want-message (UTF-8 in hex) and x-want-details-bin make it answer that error instead,
        with nothing before its status. It prints
        "dlb-peer listening on 127.0.0.1:PORT" when ready and serves until stdin closes.
        Lines on stdin change how it answers, each acknowledged with "done: LINE" on stdout
        (its health stays SERVING throughout, as a degraded instance's does):
        "fail CODE" (a number) answers every Operations call with that status; "heal"
        answers well again; "delay MS" answers every call MS milliseconds late, and prints
        "cancelled" for a call that ends before (its caller cancelled it).
"""

import json
import sys
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

UNLIMITED = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def metadata_out(pairs):
    out = []
    for key, value in pairs or ():
        if key.endswith("-bin"):
            value = bytes(value).hex()
        out.append([key, value])
    return out


def metadata_in(pairs):
    out = []
    for key, value in pairs or ():
        if key.endswith("-bin"):
            value = bytes.fromhex(value)
        out.append((key, value))
    return out


def call(channel, case):
    method = channel.unary_unary(case["method"])
    kwargs = {"metadata": metadata_in(case.get("metadata"))}
    if case.get("timeout_ms") is not None:
        kwargs["timeout"] = case["timeout_ms"] / 1000
    if case.get("compression") == "gzip":
        kwargs["compression"] = grpc.Compression.Gzip
    future = method.future(bytes.fromhex(case.get("request", "")), **kwargs)
    if case.get("cancel_after_ms") is not None:
        threading.Event().wait(case["cancel_after_ms"] / 1000)
        future.cancel()
    result = {"name": case["name"], "response": ""}
    try:
        result["response"] = future.result().hex()
    except grpc.FutureCancelledError:
        pass
    except grpc.RpcError:
        pass
    result["code"] = future.code().name
    result["message"] = future.details() or ""
    result["initial_metadata"] = metadata_out(future.initial_metadata())
    result["trailing_metadata"] = metadata_out(future.trailing_metadata())
    return result


def channel_for(plan):
    tls = plan.get("tls")
    if not tls:
        return grpc.insecure_channel(plan["target"], options=UNLIMITED)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tls["ca"]),
        private_key=read(tls["key"]),
        certificate_chain=read(tls["cert"]),
    )
    return grpc.secure_channel(plan["target"], credentials, options=UNLIMITED)


def client():
    plan = json.load(sys.stdin)
    with channel_for(plan) as channel:
        for case in plan["cases"]:
            print(json.dumps(call(channel, case)), flush=True)


# How this instance misbehaves: set from stdin (see the module's doc).
FAULT = {"code": None, "delay_ms": 0}


def echo(request, context):
    if FAULT["delay_ms"]:
        # Ends early if the call does (cancelled by the caller): then says so on stdout.
        ended = threading.Event()
        context.add_callback(ended.set)
        if ended.wait(FAULT["delay_ms"] / 1000):
            print("cancelled", flush=True)
            return request
    if FAULT["code"] is not None:
        context.abort(FAULT["code"], "fault injected by the test")
    received = context.invocation_metadata()
    wanted = {key: value for key, value in received}
    if "x-want-code" in wanted:
        code = next(c for c in grpc.StatusCode if c.value[0] == int(wanted["x-want-code"]))
        trailing = [("x-peer-trailer", "trailing")]
        if "x-want-details-bin" in wanted:
            trailing.append(("grpc-status-details-bin", wanted["x-want-details-bin"]))
        context.set_trailing_metadata(trailing)
        context.abort(code, bytes.fromhex(wanted.get("x-want-message", "")).decode())
    context.send_initial_metadata(
        [(key, value) for key, value in received if key.startswith("x-echo-")]
    )
    trailing = [("x-peer-trailer", "trailing")]
    remaining = context.time_remaining()
    if remaining is not None:
        # What is left of the deadline as this instance received it (grpc-timeout).
        trailing.append(("x-time-remaining-ms", str(int(remaining * 1000))))
    context.set_trailing_metadata(trailing)
    return request


def server():
    from concurrent import futures

    methods = ["IsPrime", "IsPalindrome", "Reverse", "Fibonacci", "WordCount"]
    handlers = {m: grpc.unary_unary_rpc_method_handler(echo) for m in methods}
    # C-core's defaults otherwise, keepalive enforcement included (a connection pinged more
    # often than every 5 minutes without data is closed with GOAWAY ENHANCE_YOUR_CALM).
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=UNLIMITED)
    srv.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dlb.v1.Operations", handlers),)
    )
    status = health.HealthServicer()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    status.set("dlb.v1.Operations", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print(f"dlb-peer listening on 127.0.0.1:{port}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["fail"]:
            FAULT["code"] = next(c for c in grpc.StatusCode if c.value[0] == int(words[1]))
        elif words[:1] == ["heal"]:
            FAULT["code"] = None
            FAULT["delay_ms"] = 0
        elif words[:1] == ["delay"]:
            FAULT["delay_ms"] = int(words[1])
        print(f"done: {line.strip()}", flush=True)
    srv.stop(grace=1).wait()


if __name__ == "__main__":
    {"client": client, "server": server}[sys.argv[1]]()
