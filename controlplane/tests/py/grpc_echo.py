"""A gRPC echo server and a proxyless xDS client, for the control plane's grpcio tests.

    grpc_echo.py serve NAME PORT      answer /strait.Echo/Say with NAME, and the gRPC health
                                      protocol (SERVING, NOT_SERVING for service "sick")
    grpc_echo.py client TARGET        call TARGET (e.g. xds:///echo.default) every 50 ms and print
                                      one line per call: the answering server's NAME, or ERR CODE
    grpc_echo.py check ADDR AUTHORITY through a proxy at ADDR, with :authority AUTHORITY: one
                                      unary call, one bidirectional stream of 20 messages (each
                                      sent after the previous answer), one call failing with a
                                      status; prints one line per check and exits

Messages are raw bytes (no .proto needed).
"""
import sys
import time
from concurrent import futures

import grpc

METHOD = "/strait.Echo/Say"


def serve(name, port):
    def say(request, context):
        return name.encode()

    def chat(requests, context):
        for r in requests:
            yield name.encode() + b":" + r
        context.set_trailing_metadata((("x-chat-end", name),))

    def fail(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{name} says no")

    handler = grpc.method_handlers_generic_handler(
        "strait.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )

    # grpc.health.v1.Health/Check: SERVING (1) for every service but "sick" (NOT_SERVING, 2).
    # HealthCheckRequest is field 1 (string); HealthCheckResponse field 1 (enum).
    def check(request, context):
        service = b""
        if len(request) >= 2 and request[0] == 0x0A:
            service = request[2 : 2 + request[1]]
        return b"\x08\x02" if service == b"sick" else b"\x08\x01"

    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(check)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler, health))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def client(target, metadata=()):
    channel = grpc.insecure_channel(target)
    say = channel.unary_unary(METHOD)
    while True:
        try:
            reply = say(b"hi", timeout=2, wait_for_ready=False, metadata=metadata)
            print(reply.decode(), flush=True)
        except grpc.RpcError as e:
            print(f"ERR {e.code().name} {e.details()}", flush=True)
        time.sleep(0.05)


def check(addr, authority):
    import queue

    channel = grpc.insecure_channel(addr, options=(("grpc.default_authority", authority),))
    print("unary " + channel.unary_unary(METHOD)(b"hi", timeout=10).decode(), flush=True)

    # Ping-pong: the next message goes only after the previous answer came back, so the
    # stream is really interactive both ways through the proxy.
    outbox = queue.Queue()
    def requests():
        while True:
            m = outbox.get()
            if m is None:
                return
            yield m
    call = channel.stream_stream("/strait.Echo/Chat")(requests(), timeout=20)
    answers = []
    for i in range(20):
        outbox.put(f"m{i}".encode())
        answers.append(next(call).decode())
    outbox.put(None)
    rest = list(call)
    trailer = dict(call.trailing_metadata() or ()).get("x-chat-end", "")
    print(f"chat {len(answers)} {answers[0]} {answers[-1]} rest={len(rest)} trailer={trailer} code={call.code().name}", flush=True)

    try:
        channel.unary_unary("/strait.Echo/Fail")(b"x", timeout=10)
        print("fail none", flush=True)
    except grpc.RpcError as e:
        print(f"fail {e.code().name} {e.details()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "client":
        # client TARGET [KEY=VALUE ...]: the metadata sent with every call
        client(sys.argv[2], tuple(tuple(kv.split("=", 1)) for kv in sys.argv[3:]))
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
