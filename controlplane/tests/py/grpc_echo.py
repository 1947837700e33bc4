"""A gRPC echo server and a proxyless xDS client, for the control plane's grpcio tests.

    grpc_echo.py serve NAME PORT      answer /strait.Echo/Say with NAME
    grpc_echo.py client TARGET        call TARGET (e.g. xds:///echo.default) every 50 ms and print
                                      one line per call: the answering server's NAME, or ERR CODE

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

    handler = grpc.method_handlers_generic_handler(
        "strait.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def client(target):
    channel = grpc.insecure_channel(target)
    say = channel.unary_unary(METHOD)
    while True:
        try:
            reply = say(b"hi", timeout=2, wait_for_ready=False)
            print(reply.decode(), flush=True)
        except grpc.RpcError as e:
            print(f"ERR {e.code().name} {e.details()}", flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "client":
        client(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
