"""`python -m server.superlink`: the Control and Runtime APIs are not served where sites connect.

The unit tests drive the gate directly; the slow ones start real SuperLinks on loopback (the
Fleet API on 127.0.0.2, the Control API on 127.0.0.1) and try `flwr supernode register` as
a stranger on the network would, through the address the sites use."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server.superlink import REFUSED, FleetOnlyOnPublicPort, fleet_path, is_loopback, split_address

from loopback import FLEET_HOST, LoopbackFederation

PUBLIC, LOCAL = 9092, 9093


def through_gate(path: str, port: int, kind: str = "http") -> tuple[list[str], list[dict]]:
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    gate = FleetOnlyOnPublicPort(app, public_port=PUBLIC)
    asyncio.run(gate({"type": kind, "path": path, "server": ("10.0.0.5", port)}, None, send))
    return reached, sent


def test_only_fleet_paths_pass_the_public_port_and_every_path_passes_the_local_one():
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/activate-node"):
        assert through_gate(path, PUBLIC)[0] == [path]
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/acquire-task", "/docs",
                 "/openapi.json", "/health", "/v1/fleet/../control/register-node", "/v1/fleet//x", "/v1/fleet"):
        reached, sent = through_gate(path, PUBLIC)
        assert reached == [] and sent[0]["status"] == 404 and sent[1]["body"] == REFUSED, path
        assert through_gate(path, LOCAL)[0] == [path]
    assert through_gate("/v1/control/x", PUBLIC, "websocket") == ([], [{"type": "websocket.close", "code": 1008}])
    assert not fleet_path("/v1/fleet/./pull-messages")


def test_addresses():
    assert split_address("0.0.0.0:9092") == ("0.0.0.0", 9092)
    assert split_address("[::]:9092") == ("::", 9092)
    for bad in ("9092", "host:", "host:99999", ":9092"):
        with pytest.raises(ValueError):
            split_address(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")


def wait_online(fed: LoopbackFederation, count: int, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while list((nodes := fed.nodes()).values()).count("online") < count:
        assert time.monotonic() < deadline, nodes
        time.sleep(1)
    return nodes


@pytest.mark.slow
def test_a_key_registered_through_the_fleet_address_is_refused_and_through_local_control_works(tmp_path, request):
    fed = LoopbackFederation(tmp_path, ["site-a"])
    request.addfinalizer(fed.close)
    fed.start_superlink()
    fed.register("site-a")  # through the Control API on 127.0.0.1
    fed.start_supernode("site-a", {"site-id": "site-a"})  # reaches the Fleet API on 127.0.0.2
    before = wait_online(fed, 1)

    outside = fed.try_register("intruder", "outside")
    assert outside.returncode != 0 and "404" in outside.stdout + outside.stderr, outside.stdout + outside.stderr
    assert fed.nodes().keys() == before.keys()
    runs = fed.flwr("ls", "outside")
    assert runs.returncode != 0 and "404" in runs.stdout + runs.stderr, runs.stdout + runs.stderr

    ca = str(fed.creds.ca_cert)
    public = f"https://{FLEET_HOST}:{fed.fleet_port}"
    for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/acquire-task"):
        answer = httpx.post(public + path, content=b"", verify=ca)
        assert (answer.status_code, answer.content) == (404, REFUSED), path
    assert httpx.post(public + "/v1/fleet/get-run", content=b"", verify=ca).content != REFUSED
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        acquire_serverapp_task(fed)
    assert httpx.post(f"https://127.0.0.1:{fed.port}/v1/control/list-nodes", content=b"", verify=ca).content != REFUSED


@pytest.mark.slow
def test_plain_flower_superlink_lets_whoever_reaches_it_register_a_key(tmp_path, request):
    """The hole the gate closes: `flower-superlink --host ...` serves Control where sites connect."""
    fed = LoopbackFederation(tmp_path, ["site-a"])
    request.addfinalizer(fed.close)
    fed.start_superlink(gated=False)
    before = fed.nodes()
    outside = fed.try_register("intruder", "outside")
    assert outside.returncode == 0, outside.stdout + outside.stderr
    assert len(fed.nodes()) == len(before) + 1
    # The Runtime API answers there too: the call the SuperLink's own SuperExec makes to claim
    # a ServerApp task (and its token); nothing is pending here, so the answer is empty.
    assert acquire_serverapp_task(fed) == ""


def acquire_serverapp_task(fed: LoopbackFederation) -> str:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=f"{FLEET_HOST}:{fed.fleet_port}", insecure=False, root_certificates=fed.creds.ca_cert.read_bytes(),
        interceptors=[], retry_invoker=make_simple_http_retry_invoker())
    try:
        return str(client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp"])))
    finally:
        client.close()
