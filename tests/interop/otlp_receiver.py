"""An OpenTelemetry collector's trace receiver for dlb's tests: OTLP over gRPC, served by
Python grpcio with the official generated code of the opentelemetry-proto package
(opentelemetry.proto.collector.trace.v1.TraceService), so what dlb exports is read by code
nobody here wrote.

It prints "otlp listening on 127.0.0.1:PORT" when ready, then one JSON object per span it
receives (service and resource attributes, ids in hex, name, kind and status names,
attributes, times), and serves until stdin closes.
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

PRINT = threading.Lock()


def value(any_value):
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    found = getattr(any_value, kind)
    return found.hex() if isinstance(found, bytes) else found


def attributes(pairs):
    return {kv.key: value(kv.value) for kv in pairs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "service": resource.get("service.name"),
                                "resource": resource,
                                "scope": scope_spans.scope.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "trace_state": span.trace_state,
                                "name": span.name,
                                "kind": trace_pb2.Span.SpanKind.Name(span.kind),
                                "status": trace_pb2.Status.StatusCode.Name(span.status.code),
                                "status_message": span.status.message,
                                "attributes": attributes(span.attributes),
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "flags": span.flags,
                            }
                        )
                    )
        with PRINT:
            for line in lines:
                print(line)
            sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with PRINT:
        print(f"otlp listening on 127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    server.stop(0)


main()
