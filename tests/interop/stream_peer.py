"""A gRPC service of all four call kinds in Python grpcio (C-core), for the gateway's any-service
relay tests: an instance written in another stack, and clients that measure through the gateway.

Messages are raw bytes, not protobuf (the gateway must relay any codec); the service still has
a descriptor (messages with one bytes field), served by reflection, so grpcurl can list and
describe it through the gateway.

server NAME [SERVICE]: with STREAM_PEER_REFUSE=1 it reads each request whole and answers
        UNAVAILABLE, as a draining server does. Otherwise serves SERVICE (default test.v1.Streams) and grpc.health.v1 (SERVICE
        and "" SERVING) and reflection on 127.0.0.1 port 0; prints
        "stream-peer NAME listening on 127.0.0.1:PORT", then one line per event:
        "cancelled METHOD T" when a call is cancelled (T: time.time()), until stdin closes.
        Methods:
          Unary(bytes) -> the same bytes; initial metadata x-peer: NAME.
          ServerStream(b"COUNT,INTERVAL_MS,SIZE") -> COUNT messages, each its index as 8 bytes
              big-endian padded with zeros to SIZE bytes, INTERVAL_MS apart.
          ClientStream(messages) -> b"MESSAGES,BYTES" received.
          Bidi(messages) -> each message echoed as it comes.
client TARGET SCENARIO ARGS...: prints one JSON object with what it measured (the service
        called: $STREAM_PEER_SERVICE, default test.v1.Streams).
"""

import json
import os
import struct
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "test.v1.Streams"
UNLIMITED = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def add_reflection(server, service):
    """Registers a descriptor of `service` (one bytes field per message) and serves reflection
    for it; without grpcio-reflection installed, serves none."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        return
    package, _, name = service.rpartition(".")
    proto = descriptor_pb2.FileDescriptorProto()
    proto.name = package.replace(".", "/") + "/" + name.lower() + ".proto"
    proto.package = package
    proto.syntax = "proto3"
    message = proto.message_type.add()
    message.name = "Chunk"
    field = message.field.add()
    field.name, field.number = "data", 1
    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    field.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    svc = proto.service.add()
    svc.name = name
    for method, client, server_ in [
        ("Unary", False, False),
        ("ServerStream", False, True),
        ("ClientStream", True, False),
        ("Bidi", True, True),
    ]:
        m = svc.method.add()
        m.name = method
        m.input_type = m.output_type = "." + package + ".Chunk"
        m.client_streaming, m.server_streaming = client, server_
    descriptor_pool.Default().Add(proto)
    reflection.enable_server_reflection(
        [service, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


def serve(name, service):
    events = sys.stdout
    lock = threading.Lock()

    def say(line):
        with lock:
            events.write(line + "\n")
            events.flush()

    refuse = os.environ.get("STREAM_PEER_REFUSE") == "1"

    def refused(context):
        # As a draining server would: UNAVAILABLE with nothing before it, after reading the
        # whole request (so the gateway's hold on it is what decides a retry).
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} refuses every call")

    def unary(request, context):
        if refuse:
            refused(context)
        context.send_initial_metadata((("x-peer", name),))
        return request

    def server_stream(request, context):
        if refuse:
            refused(context)
        count, interval_ms, size = (int(x) for x in request.decode().split(","))
        done = threading.Event()
        # Runs when the call ends, however it ends: a cancel arrives here.
        context.add_callback(
            lambda: None if done.is_set() else say(f"cancelled ServerStream {time.time():.6f}")
        )
        context.send_initial_metadata((("x-peer", name),))
        for i in range(count):
            yield struct.pack(">Q", i).ljust(size, b"\0")
            if interval_ms:
                time.sleep(interval_ms / 1000)
        done.set()

    def client_stream(request_iterator, context):
        messages = total = 0
        for message in request_iterator:
            messages += 1
            total += len(message)
        if refuse:
            refused(context)
        return f"{messages},{total}".encode()

    def bidi(request_iterator, context):
        if refuse:
            for _ in request_iterator:
                refused(context)
        context.send_initial_metadata((("x-peer", name),))
        for message in request_iterator:
            yield message

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=UNLIMITED)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
                },
            ),
        )
    )
    health_servicer = health.HealthServicer()
    for served in ("", service):
        health_servicer.set(served, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server, service)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(f"stream-peer {name} listening on 127.0.0.1:{port}")
    sys.stdin.read()
    server.stop(0)


def client(target, scenario, args):
    channel = grpc.insecure_channel(target, options=UNLIMITED)
    grpc.channel_ready_future(channel).result(timeout=30)
    service = os.environ.get("STREAM_PEER_SERVICE", SERVICE)
    path = lambda method: f"/{service}/{method}"
    out = {"scenario": scenario}
    if scenario == "unary":
        calls = int(args[0])
        unary = channel.unary_unary(path("Unary"))
        served = []
        for i in range(calls):
            try:
                reply, call = unary.with_call(b"ping %d" % i, timeout=10)
            except grpc.RpcError as error:
                out["code"], out["message"] = error.code().name, error.details()
                break
            assert reply == b"ping %d" % i, reply
            served.append(dict(call.initial_metadata()).get("x-served-by"))
        out["served_by"] = served
    elif scenario == "server-stream":
        calls, count, interval_ms = (int(x) for x in args[:3])
        stream = channel.unary_stream(path("ServerStream"))
        results = [None] * calls

        def one(k):
            start = time.perf_counter()
            first = None
            n = 0
            in_order = True
            for message in stream(f"{count},{interval_ms},16".encode(), timeout=120):
                if first is None:
                    first = time.perf_counter() - start
                in_order &= struct.unpack(">Q", message[:8])[0] == n
                n += 1
            results[k] = {"first_ms": first * 1000, "messages": n, "in_order": in_order}

        threads = [threading.Thread(target=one, args=(k,)) for k in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["calls"] = results
    elif scenario == "client-stream":
        total, size = int(args[0]), int(args[1])
        upload = channel.stream_unary(path("ClientStream"))
        chunk = b"\x07" * size
        start = time.perf_counter()
        reply = upload(iter([chunk] * (total // size)), timeout=600)
        out["seconds"] = time.perf_counter() - start
        messages, received = (int(x) for x in reply.decode().split(","))
        out["messages"], out["bytes"] = messages, received
    elif scenario == "uploads":
        # CALLS client streams of TOTAL bytes in MESSAGE-byte messages, one after another: the
        # code and x-attempts of each.
        calls, total, size = (int(x) for x in args[:3])
        upload = channel.stream_unary(path("ClientStream"))
        results = []
        for _ in range(calls):
            try:
                _, call = upload.with_call(iter([b"\x07" * size] * (total // size)), timeout=60)
                results.append({"code": "OK", "attempts": dict(call.initial_metadata()).get("x-attempts")})
            except grpc.RpcError as error:
                trailing = dict(error.trailing_metadata() or ())
                initial = dict(error.initial_metadata() or ())
                attempts = trailing.get("x-attempts") or initial.get("x-attempts")
                results.append({"code": error.code().name, "attempts": attempts, "message": error.details()})
        out["calls"] = results
    elif scenario == "bidi-burst":
        # COUNT messages sent at once, without waiting for echoes: every one must come back,
        # in order (the instance sends its headers first, so the answer begins while the
        # request is still arriving).
        count = int(args[0])
        echo = channel.stream_stream(path("Bidi"))
        sent = [b"burst %d " % i + b"." * 1000 for i in range(count)]
        got = list(echo(iter(sent), timeout=60))
        out["echoed"] = len(got)
        out["in_order"] = got == sent
    elif scenario == "bidi":
        rounds = int(args[0])
        requests = []
        cond = threading.Condition()

        def feed():
            for i in range(rounds):
                with cond:
                    cond.wait_for(lambda: len(requests) > i)
                yield requests[i]

        echo = channel.stream_stream(path("Bidi"))
        got = 0
        answers = echo(feed(), timeout=60)
        # The caller waits for the answer's headers before it sends anything (the instance
        # sends them first): a relay that held the headers back for a message would hang here.
        out["peer"] = dict(answers.initial_metadata()).get("x-peer")
        with cond:
            requests.append(b"round 0")
            cond.notify_all()
        for answer in answers:
            assert answer == b"round %d" % got, (answer, got)
            got += 1
            if got < rounds:
                with cond:
                    requests.append(b"round %d" % got)
                    cond.notify_all()
        out["rounds"] = got
    elif scenario == "cancel":
        after_ms = int(args[0])
        stream = channel.unary_stream(path("ServerStream"))
        call = stream(b"100000,10,16", timeout=120)
        next(call)
        time.sleep(after_ms / 1000)
        out["cancelled_at"] = time.time()
        call.cancel()
    elif scenario == "until-killed":
        # A long server stream: prints "streaming" after its first message (the test then kills
        # the instance), then the code it ended with and when.
        stream = channel.unary_stream(path("ServerStream"))
        call = stream(b"100000,10,16", timeout=120)
        next(call)
        served_by = dict(call.initial_metadata()).get("x-served-by")
        print(json.dumps({"streaming": True, "served_by": served_by}), flush=True)
        try:
            for _ in call:
                pass
            out["code"] = "OK"
        except grpc.RpcError as error:
            out["code"] = error.code().name
            out["message"] = error.details()
        out["ended_at"] = time.time()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else SERVICE)
    else:
        client(sys.argv[2], sys.argv[3], sys.argv[4:])
