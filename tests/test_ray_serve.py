"""The server on Ray Serve: a local Ray instance (2 CPUs), two CPU replicas of the tiny model, 3 stream slots each,
one proxy queue slot; loopback only. One module-scoped cluster; the tests run in file order and the last one shuts
it down and checks that no Ray process is left. Marked `ray` (`pytest -m "not ray"` skips them)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

ray = pytest.importorskip("ray", reason="the Ray Serve tests need the [ray] extra: pip install 'omnivox[ray]'")
serve = pytest.importorskip("ray.serve")

from omnivox.deploy import ray_serve  # noqa: E402  (needs ray)
from omnivox.deploy.ray_proxy import CALLBACK, CALLBACK_ENV  # noqa: E402
from omnivox.engine.engine import EngineConfig  # noqa: E402
from omnivox.server.serving import ServerConfig  # noqa: E402

pytestmark = pytest.mark.ray

SLOTS = 3
LONG_READ = " ".join(["the quick brown fox jumps over the lazy dog"] * 7)  # 63 words: 25 s of scripted audio
LONG_CHAT = "What's your favorite color?"  # the standard workload's longest scripted reply (12.8 s)
CHAT_AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}}


@dataclass
class Cluster:
    url: str
    ws_url: str
    replicas: dict[str, dict]  # replica id -> its /replica answer (actor name, metrics_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (from /proc: Ray's processes are children of the driver or the raylet)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def replica_states() -> dict[str, int]:
    app = serve.status().applications.get(ray_serve.APP_NAME)
    return dict(app.deployments[ray_serve.DEPLOYMENT_NAME].replica_states) if app else {}


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def discover_replicas(url: str, count: int = 2) -> dict[str, dict]:
    """Both replicas' /replica answers: idle replicas are picked at random, so a few asks reach each."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 30  # a restarted replica reaches the proxy's routing table a little later
    while len(found) < count:
        assert time.monotonic() < deadline, f"only replicas {sorted(found)} answered"
        info = httpx.get(url + "/replica").json()
        found[info["replica"]] = info
        time.sleep(0.02)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    previous = os.environ.get(CALLBACK_ENV)
    os.environ[CALLBACK_ENV] = CALLBACK  # the local cluster's proxy loads omnivox's middleware
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    spec = ray_serve.ReplicaSpec(engine_config=EngineConfig(max_concurrent_requests=SLOTS),
                                 server_config=ServerConfig(dummy_weights=True, max_input_chars=1000),
                                 torch_threads=1)
    port = free_port()
    try:
        ray_serve.run(ray_serve.application(spec, replicas=2, num_cpus=0.5, max_queued_requests=1), "127.0.0.1",
                      port)
        url = f"http://127.0.0.1:{port}"
        yield Cluster(url, f"ws://127.0.0.1:{port}/v1/stream", discover_replicas(url))
    finally:
        if ray.is_initialized():
            ray_serve.shutdown()
        if previous is None:
            os.environ.pop(CALLBACK_ENV, None)
        else:
            os.environ[CALLBACK_ENV] = previous


def open_socket(cluster: Cluster, stack: ExitStack) -> tuple[ClientConnection, str]:
    """A WebSocket (closed with `stack` at the latest) and the replica that holds it."""
    ws = stack.enter_context(connect(cluster.ws_url, open_timeout=30))
    return ws, ws.response.headers["x-omnivox-replica"]


def ws_events(ws: ClientConnection) -> Iterator[dict | bytes]:
    while True:
        frame = ws.recv(timeout=60)
        yield frame if isinstance(frame, bytes) else json.loads(frame)


def speak_to_done(ws: ClientConnection, text: str = "Hello there.") -> dict:
    ws.send(json.dumps({"type": "speak", "text": text, "mode": "read", "seed": 0}))
    for event in ws_events(ws):
        if isinstance(event, dict) and event["type"] in ("done", "error"):
            return event
    raise AssertionError("unreachable")


def sse_payloads(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in\n{text}")


# ------------------------------------------------------------------------------------------------------ routing


def test_replicas_share_the_load_and_stream_as_they_generate(cluster):
    """An idle WebSocket holds a slot of one replica; the least-loaded choice sends the streams to the other, whose
    own metrics show the stream still running when its first chunk has already arrived."""
    assert len(cluster.replicas) == 2
    with ExitStack() as stack:
        ws, held = open_socket(cluster, stack)
        other = next(r for r in cluster.replicas if r != held)
        body = {"input": LONG_READ, "stream_format": "sse", "seed": 3}
        with httpx.stream("POST", cluster.url + "/v1/audio/speech", json=body, timeout=60) as response:
            assert response.status_code == 200 and response.headers["x-omnivox-replica"] == other
            assert response.headers["x-request-id"].startswith("speech-")  # the replica's id, not Ray's too
            events = sse_payloads(response.iter_lines())
            first = next(events)
            assert first["type"] == "speech.audio.delta"
            live = httpx.get(cluster.replicas[other]["metrics_url"]).text
            assert metric_value(live, "omnivox_streams_active") == 1.0, "the first chunk came only at the end"
            rest = list(events)
        assert sum(e["type"] == "speech.audio.delta" for e in rest) >= 3 and rest[-1]["type"] == "speech.audio.done"
        assert rest[-1]["metrics"]["finish_reason"] == "eos"

        chat = {"messages": [{"role": "user", "content": "Hi, how are you?"}], "stream": True, **CHAT_AUDIO}
        with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=chat, timeout=60) as response:
            assert response.status_code == 200 and response.headers["x-omnivox-replica"] == other
            payloads = list(sse_payloads(response.iter_lines()))
        assert payloads[-1] == "[DONE]" and payloads[-2]["choices"][0]["finish_reason"] == "stop"
        assert speak_to_done(ws)["type"] == "done"  # the WebSocket's replica serves it meanwhile

    for path in ("/healthz", "/readyz", "/v1/models"):
        assert httpx.get(cluster.url + path).status_code == 200
    scraped = httpx.get(cluster.replicas[other]["metrics_url"]).text  # each replica's own registry, labelled
    assert metric_value(scraped, "target_info", replica=other, deployment=ray_serve.DEPLOYMENT_NAME) == 1.0
    assert metric_value(scraped, "omnivox_requests_total", endpoint="speech", finish_reason="eos") >= 1
    assert metric_value(scraped, "omnivox_requests_total", endpoint="chat", finish_reason="eos") >= 1
    held_metrics = httpx.get(cluster.replicas[held]["metrics_url"]).text
    assert metric_value(held_metrics, "omnivox_requests_total", endpoint="ws", finish_reason="eos") >= 1


def test_every_slot_taken_answers_429_and_the_queue_is_bounded(cluster):
    """2 replicas x 3 slots held by idle WebSockets: of two more requests one waits in the proxy's one-slot queue
    and the other is refused at once with 429 + Retry-After in the OpenAI envelope; freeing slots serves the
    queued one."""
    with ExitStack() as stack:
        sockets = [open_socket(cluster, stack) for _ in range(2 * SLOTS)]
        by_replica: dict[str, list[ClientConnection]] = {}
        for ws, replica in sockets:
            by_replica.setdefault(replica, []).append(ws)
        assert sorted(len(v) for v in by_replica.values()) == [SLOTS, SLOTS]
        results: list[httpx.Response] = []

        def speak() -> None:
            results.append(httpx.post(cluster.url + "/v1/audio/speech", json={"input": "Hello there."}, timeout=60))

        threads = [threading.Thread(target=speak) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) == 1, 30, "the request beyond the queue to be refused")
        refused = results[0]
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "all_replicas_busy"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        first = next(iter(by_replica.values()))
        for ws in first:  # one replica's slots free up: the queued request goes there
            ws.close()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 2 and results[1].status_code == 200
        assert results[1].content[:4] == b"RIFF"


# ------------------------------------------------------------------------------------------------------ faults


def test_replica_killed_mid_stream_ends_streams_cleanly_and_the_rest_carry_on(cluster):
    """One replica is kept full by idle WebSockets, so a chat SSE stream, a raw WAV stream and a WebSocket reply all
    run on the other one; killing it mid-stream gives each its clean end (SSE error event + [DONE], incomplete
    transfer, WebSocket error event + close 1011); the survivor keeps serving and Ray restarts the dead replica."""
    wait_for(lambda: replica_states().get("RUNNING") == 2, 60, "two running replicas")
    stack = ExitStack()
    holders = [open_socket(cluster, stack) for _ in range(2 * SLOTS)]
    by_replica: dict[str, list[ClientConnection]] = {}
    for ws, replica in holders:
        by_replica.setdefault(replica, []).append(ws)
    victim, survivor = sorted(by_replica, key=lambda r: r != holders[0][1])  # free the first one's replica
    for ws in by_replica[victim]:
        ws.close()
    client = httpx.Client(timeout=60)
    try:
        chat_body = {"messages": [{"role": "user", "content": LONG_CHAT}], "stream": True, **CHAT_AUDIO}
        chat = client.send(client.build_request("POST", cluster.url + "/v1/chat/completions", json=chat_body),
                           stream=True)
        wav = client.send(client.build_request("POST", cluster.url + "/v1/audio/speech",
                                               json={"input": LONG_READ, "response_format": "wav"}), stream=True)
        ws, ws_replica = open_socket(cluster, stack)
        assert {chat.headers["x-omnivox-replica"], wav.headers["x-omnivox-replica"], ws_replica} == {victim}
        chat_events = sse_payloads(chat.iter_lines())
        assert next(chat_events)["choices"][0]["delta"] == {"role": "assistant"}
        assert "audio" in next(chat_events)["choices"][0]["delta"]  # mid-stream: audio is flowing
        wav_bytes = wav.iter_bytes()
        assert next(wav_bytes)[:4] == b"RIFF"
        ws.send(json.dumps({"type": "speak", "text": LONG_READ, "mode": "read"}))
        ws_frames = ws_events(ws)
        assert next(ws_frames)["type"] == "start"

        ray.kill(ray.get_actor(cluster.replicas[victim]["actor_name"], namespace="serve"), no_restart=False)

        rest = list(chat_events)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "replica_failed", rest[-2:]
        assert all("error" not in e for e in rest[:-2]) and "finish_reason" not in json.dumps(rest[:-2])
        with pytest.raises(httpx.RemoteProtocolError):  # a raw body cannot say why: it is cut off
            for _ in wav_bytes:
                pass
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            for event in ws_frames:
                events.append(event)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert isinstance(events[-1], dict) and events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "replica_failed"
    finally:
        client.close()

    survivors = by_replica[survivor]
    assert speak_to_done(survivors[0])["type"] == "done"  # sessions on the survivor are untouched
    stack.close()
    for _ in range(4):  # new requests go to the living replica (the dead one is being replaced meanwhile)
        response = httpx.post(cluster.url + "/v1/audio/speech", json={"input": "Hello there."}, timeout=60)
        assert response.status_code == 200 and response.headers["x-omnivox-replica"] != victim
    wait_for(lambda: replica_states().get("RUNNING") == 2, 120, "Ray to restart the killed replica")
    restarted = discover_replicas(cluster.url)
    assert victim not in restarted and survivor in restarted


# ------------------------------------------------------------------------------------------------------ shutdown


def test_shutdown_leaves_no_ray_process(cluster):
    ours = descendants(os.getpid())
    assert ours, "the local Ray instance runs as processes under this one"
    ray_serve.shutdown()
    assert not ray.is_initialized()
    wait_for(lambda: not any(alive(pid) for pid in ours), 30, "Ray's processes to exit")
    assert not any(alive(pid) for pid in descendants(os.getpid()))


# ------------------------------------------------------------------------------------------------------ config


def test_serve_config_file_builds_the_documented_deployment():
    """The shipped Serve config is valid for `serve run/deploy`, and its args give one GPU per replica, slots =
    max_ongoing_requests, a bounded 429 queue and autoscaling at 0.7 x slots."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(ray_serve.__file__).parent / "serve_config.yaml").read_text())
    (app_config,) = ServeDeploySchema.model_validate(config).applications
    assert app_config.import_path == "omnivox.deploy.ray_serve:app_builder"
    deployment = ray_serve.app_builder(app_config.args)._bound_deployment
    spec = deployment.init_args[0]
    assert (spec.device, spec.dummy_weights, spec.engine_config.path) == ("cuda", True, "fast")
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment.max_ongoing_requests == spec.slots == 8 and deployment.max_queued_requests == 8
    assert deployment.backpressure_config.status_code == 429
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.target_ongoing_requests == pytest.approx(0.7 * 8)
    fixed = ray_serve.app_builder({"replicas": 3, "max_queued_requests": 2})._bound_deployment
    assert fixed.num_replicas == 3 and fixed.max_queued_requests == 2 and fixed.ray_actor_options["num_gpus"] == 0
    with pytest.raises(ray_serve.OmnivoxError, match="MIN:MAX"):
        ray_serve.app_builder({"autoscale": "4"})
