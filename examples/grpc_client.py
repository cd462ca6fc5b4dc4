"""Generate images from a reference image over gRPC and save them.

    .venv/bin/python examples/grpc_client.py --image tests/assets/reference.png \
        --prompt "the same toy on a beach" --out outputs/beach.png --steps 8 --seed 1 --stream

The stubs come from `dsd_serve.grpc_stubs` (generated from proto/dsd/v1/dsd.proto); clients in other languages
generate theirs from the same file. Set DSD_API_KEY when the server requires a key. Against a server with TLS
(DSD_GRPC_TLS_CERT) pass the CA that signed its certificate, and with mutual TLS (DSD_GRPC_TLS_CLIENT_CA) a client
certificate too:

    .venv/bin/python examples/grpc_client.py --target dsd.example.com:50051 --tls-ca ca.pem \
        --tls-cert client.pem --tls-key client-key.pem --image tests/assets/reference.png --prompt "..."
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from dsd_serve.grpc_stubs import dsd_pb2, dsd_pb2_grpc

MAX_RESPONSE_BYTES = 64 * 2**20
"""Responses carry encoded images of up to 3 MiB each; gRPC's default receive limit is 4 MiB."""


def open_channel(args: argparse.Namespace, options: list) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target, options=options)
    client = {}
    if args.tls_cert is not None:
        client = dict(certificate_chain=args.tls_cert.read_bytes(), private_key=args.tls_key.read_bytes())
    credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes(), **client)
    return grpc.secure_channel(args.target, credentials, options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--image", type=Path, required=True, help="reference image (PNG, JPEG or WebP)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", type=Path, default=Path("outputs/grpc.png"),
                        help="output PNG; image i of several is saved as <stem>-<i>.png")
    parser.add_argument("--mode", choices=["identity", "structure"],
                        help="selects the adapter; the server's default adapter when absent")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--timeout", type=float, default=300.0, help="the call's deadline in seconds")
    parser.add_argument("--stream", action="store_true", help="print progress while the images denoise")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle that signed the server's certificate: use TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate, for servers requiring mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--consent", action="store_true",
                        help="the person shown agreed to this use (servers with an input check may require it)")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca: client certificates are only sent over TLS")

    request = dsd_pb2.GenerateRequest(
        image=args.image.read_bytes(),
        prompt=args.prompt,
        mode={None: dsd_pb2.MODE_UNSPECIFIED, "identity": dsd_pb2.MODE_IDENTITY,
              "structure": dsd_pb2.MODE_STRUCTURE}[args.mode],
        steps=args.steps,
        seed=args.seed,
        size=args.size,
        num_images=args.num_images,
        consent=args.consent or None,
    )
    metadata = [("authorization", f"Bearer {os.environ['DSD_API_KEY']}")] if os.environ.get("DSD_API_KEY") else []
    options = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
    with open_channel(args, options) as channel:
        stub = dsd_pb2_grpc.DSDServiceStub(channel)
        try:
            if args.stream:
                response = None
                for event in stub.GenerateStream(request, metadata=metadata, timeout=args.timeout):
                    if event.HasField("queued"):
                        print(f"image {event.queued.image_index}: queued at position {event.queued.position}")
                    elif event.HasField("step"):
                        print(f"image {event.step.image_index}: step {event.step.step}/{event.step.total}")
                    else:
                        response = event.result
            else:
                response = stub.Generate(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            print(f"{error.code().name}: {error.details()} {trailing}", file=sys.stderr)
            return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(response.images):
        path = args.out.with_stem(f"{args.out.stem}-{index}") if len(response.images) > 1 else args.out
        path.write_bytes(data)
        print(f"saved {path} (seed {response.seeds[index]})")
    print(f"profile {response.profile}, request {response.request_id}, {response.timings.total_s:.2f} s")
    if response.notice:
        print(response.notice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
