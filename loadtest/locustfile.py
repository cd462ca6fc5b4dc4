"""Load for DSD Serve over both transports, with the request mix of a product backend.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --grpc-target 127.0.0.1:50051 --api-key KEY

A few popular references come back again and again (condition-latent cache hits), with both modes, varied step
counts, some true-CFG requests (three transformer rows each) and some two-image requests. `loadtest/run` starts a
local service and runs this headless; against a cluster, point --host and --grpc-target at its Service.
"""

import base64
import io
import json
import random
import time

import grpc
import grpc.experimental.gevent

grpc.experimental.gevent.init_gevent()  # before any channel: gRPC then yields to locust's gevent loop

import numpy as np  # noqa: E402
from locust import FastHttpUser, User, between, events, task  # noqa: E402
from PIL import Image  # noqa: E402

from dsd_serve.grpc_stubs import dsd_pb2, dsd_pb2_grpc  # noqa: E402

REQUEST_TIMEOUT_S = 330.0
"""Longer than the service's default deadline (300 s), so the server, not the client, decides a timeout."""
REFERENCES = 8
POPULAR = 2
"""The first references take most of the traffic: a product's few current subjects."""
PROMPTS = ("the same toy on a beach at sunset", "the same toy in the snow, close-up", "a watercolour of the same toy",
           "the same object on a wooden desk, studio light")
MAX_RESPONSE_BYTES = 32 * 2**20
"""Four images of up to 3 MiB each (the bound the proto states), with room to spare."""


def reference_png(seed: int, side: int = 96) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [reference_png(seed) for seed in range(REFERENCES)]


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port of the gRPC API")
    parser.add_argument("--api-key", default="", env_var="DSD_API_KEY", help="sent as `Authorization: Bearer`")
    parser.add_argument("--image-size", type=int, default=64,
                        help="output side; 512 is the official size, 64 keeps the tiny profile cheap on CPUs")
    parser.add_argument("--steps", default="4,8,12,28", help="step counts to draw from (28 is the official one)")


def request_mix(rng: random.Random, options) -> dict:
    """One request of the mix, as the fields of `POST /generate` without the image."""
    cfg = rng.random() < 0.15
    return dict(
        reference=rng.choices(range(REFERENCES), weights=[6] * POPULAR + [1] * (REFERENCES - POPULAR))[0],
        prompt=rng.choice(PROMPTS),
        mode=rng.choices(("identity", "structure"), weights=(3, 1))[0],
        steps=int(rng.choice(options.steps.split(","))),
        seed=rng.randrange(2**32),
        size=options.image_size,
        num_images=rng.choices((1, 2), weights=(9, 1))[0],
        image_guidance=1.5 if cfg else 1.0,
        text_guidance=1.2 if cfg else 1.0,
    )


def error_code(response) -> str:
    """The `error.code` of the service's error body (request ids left out, so locust groups failures by kind)."""
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return response.text[:80]


class JsonUser(FastHttpUser):
    """What the REST and job users share: timeouts, the API key, and a JSON request body from the mix."""

    abstract = True
    wait_time = between(0.2, 1.0)
    network_timeout = REQUEST_TIMEOUT_S
    connection_timeout = 10.0

    def on_start(self):
        self.rng = random.Random()
        key = self.environment.parsed_options.api_key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request_body(self) -> tuple[dict, dict]:
        """The drawn fields (without the reference) and the JSON body with the reference image."""
        fields = request_mix(self.rng, self.environment.parsed_options)
        image = IMAGES[fields.pop("reference")]
        return fields, dict(fields, image=base64.b64encode(image).decode("ascii"))


class RestUser(JsonUser):
    """`POST /generate` with a JSON body."""

    weight = 3

    @task
    def generate(self):
        fields, body = self.request_body()
        with self.client.post("/generate", json=body, headers=self.headers, name=f"/generate {fields['mode']}",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code} {error_code(response)}")
            elif len(response.json()["images"]) != fields["num_images"]:
                response.failure("wrong number of images")


class JobUser(JsonUser):
    """`POST /v1/jobs`, then the job's Server-Sent Events, read to their end (the final status); reported as
    `job submit` (the 202), `job events` and `job done` (submission to the final status). Run it by naming it:
    `locust ... JobUser` (`loadtest/run --jobs`)."""

    weight = 1

    @task
    def job(self):
        _, body = self.request_body()
        started = time.perf_counter()
        with self.client.post("/v1/jobs", json=body, headers=self.headers, name="job submit",
                              catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"HTTP {response.status_code} {error_code(response)}")
                return
            job_id = response.json()["id"]
        final, exception = None, None
        with self.client.get(f"/v1/jobs/{job_id}/events", headers=self.headers, name="job events",
                             catch_response=True) as stream:
            for line in stream.text.splitlines():
                if line.startswith("data: "):
                    final = json.loads(line[len("data: "):])
        if final is None or final["status"] != "succeeded":
            exception = RuntimeError(f"job ended {final and final['status']}: {final and final['error']}")
        self.environment.events.request.fire(
            request_type="JOB", name="job done", response_time=(time.perf_counter() - started) * 1000,
            response_length=0, response=None, context=None, exception=exception,
        )


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to locust as one request (locust's gRPC pattern)."""

    def __init__(self, environment):
        self.environment = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            response = continuation(client_call_details, request)
            length = response.result().ByteSize()
        except grpc.RpcError as error:
            exception = RuntimeError(error.code().name)
        method = client_call_details.method.rsplit("/", 1)[-1]
        mode = dsd_pb2.Mode.Name(request.mode).removeprefix("MODE_").lower()
        self.environment.events.request.fire(
            request_type="gRPC", name=f"{method} {mode}", response_time=(time.perf_counter() - started) * 1000,
            response_length=length, response=response, context=None, exception=exception,
        )
        return response


class GrpcUser(User):
    """`dsd.v1.DSDService/Generate` on one channel per user."""

    weight = 1
    wait_time = between(0.2, 1.0)

    def on_start(self):
        self.rng = random.Random()
        options = self.environment.parsed_options
        self.channel = grpc.insecure_channel(options.grpc_target,
                                             options=[("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)])
        self.stub = dsd_pb2_grpc.DSDServiceStub(
            grpc.intercept_channel(self.channel, LocustInterceptor(self.environment))
        )
        self.metadata = (("authorization", f"Bearer {options.api_key}"),) if options.api_key else ()

    def on_stop(self):
        self.channel.close()

    @task
    def generate(self):
        fields = request_mix(self.rng, self.environment.parsed_options)
        request = dsd_pb2.GenerateRequest(
            image=IMAGES[fields.pop("reference")],
            mode=dsd_pb2.MODE_IDENTITY if fields.pop("mode") == "identity" else dsd_pb2.MODE_STRUCTURE,
            **fields,
        )
        try:
            self.stub.Generate(request, metadata=self.metadata, timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError:
            pass  # the interceptor reported it as a failed request
