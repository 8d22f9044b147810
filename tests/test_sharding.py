"""Sharding cameras over replicas (`--shard-index/--shard-count`, rendezvous hashing) and the routing client:
the hash's properties on many ids, then two real servers over loopback gRPC sharing one camera list."""

from __future__ import annotations

import io
import json
import os
import threading
from collections import Counter

import grpc
import pytest
from test_server_harness import ServerProcess, wait_until

from yolov12_serve.cli import build_parser, parse_config
from yolov12_serve.errors import ConfigError
from yolov12_serve.routing import ShardedClient
from yolov12_serve.sharding import ShardSpec, owner, pod_ordinal

IDS = [f"plant{p}-line{line}-cam{c}" for p in range(4) for line in range(25) for c in range(100)]  # 10,000 ids


@pytest.mark.parametrize("n", range(1, 9))
def test_every_camera_has_exactly_one_owner(n):
    specs = [ShardSpec(i, n) for i in range(n)]
    for sid in IDS[:2000]:
        owners = [s.index for s in specs if s.owns(sid)]
        assert owners == [owner(sid, n)], sid


@pytest.mark.parametrize("n", range(1, 8))
def test_adding_a_shard_moves_about_one_in_n_plus_one_cameras_all_to_the_new_shard(n):
    before = {sid: owner(sid, n) for sid in IDS}
    after = {sid: owner(sid, n + 1) for sid in IDS}
    moved = [sid for sid in IDS if before[sid] != after[sid]]
    assert {after[sid] for sid in moved} == {n}  # nothing moves between the old shards
    share = len(moved) / len(IDS)
    assert abs(share - 1 / (n + 1)) < 0.02, (n, share)  # 5 standard deviations of a fair draw at 10,000 ids
    counts = Counter(after.values())
    assert max(counts.values()) / min(counts.values()) < 1.15, counts  # and the shares stay even


def test_the_hash_is_the_same_everywhere():
    """Servers and clients on other machines and Python versions must agree: pinned values (not hash())."""
    assert [owner(f"line1-cam{i}", 3) for i in range(1, 9)] == PINNED
    assert owner("x", 1) == 0
    with pytest.raises(ValueError):
        owner("x", 0)


PINNED = [0, 0, 0, 0, 2, 0, 1, 0]  # BLAKE2b-64 of "shard\0id", highest wins


def test_shard_index_comes_from_the_pod_name_when_absent(monkeypatch):
    assert pod_ordinal("yolov12-serve-12") == 12 and pod_ordinal("serve") is None
    assert ShardSpec.resolve(None, 3, "yolov12-serve-2") == ShardSpec(2, 3)
    assert ShardSpec.resolve(1, 3, "anything") == ShardSpec(1, 3)
    assert ShardSpec.resolve(None, None, "no-ordinal") == ShardSpec(0, 1)  # one replica: no name needed
    monkeypatch.setenv("POD_NAME", "yolov12-serve-1")
    assert ShardSpec.resolve(None, 2) == ShardSpec(1, 2)
    with pytest.raises(ConfigError, match="ordinal"):
        ShardSpec.resolve(None, 2, "workstation")
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        ShardSpec.resolve(None, 3, "yolov12-serve-3")  # a pod beyond --shard-count


def test_each_replica_keeps_its_share_of_the_listed_cameras(monkeypatch):
    monkeypatch.setenv("POD_NAME", "yolov12-serve-1")
    sources = [f"synthetic://c{i}" for i in range(40)]
    mine: list[set[str]] = []
    for index in ("0", None):  # replica 1 reads its index from the pod name
        argv = ["--demo", "--shard-count", "2", *(["--shard-index", index] if index else [])]
        for url in sources:
            argv += ["--source", url]
        config, streams = parse_config(build_parser().parse_args(argv))
        mine.append({s.stream_id for s in streams})
        assert all(owner(s, 2) == config.shard.index for s in mine[-1])
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == {f"cam{i}" for i in range(40)}
    assert 10 <= len(mine[0]) <= 30


# ------------------------------------------------------------------------------------------ two real replicas
CAMS = ["line1-cam1", "line1-cam2", "line1-cam7", "line1-cam11"]  # two per replica


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    streams = tmp_path_factory.mktemp("shards") / "cameras.yaml"
    streams.write_text("streams:\n" + "".join(f"  - {{id: {c}, url: 'synthetic://{c}?fps=3&size=320x180'}}\n"
                                              for c in CAMS))
    os.environ["POD_NAME"] = "yolov12-serve-1"  # replica 1 takes its index from it (replica 0 is told)
    try:
        servers = [ServerProcess("--demo", "--no-status", "--streams", str(streams), "--shard-count", "2",
                                 "--shard-index", "0", "--instances", "1"),
                   ServerProcess("--demo", "--no-status", "--streams", str(streams), "--shard-count", "2",
                                 "--instances", "1")]
    finally:
        del os.environ["POD_NAME"]
    yield servers
    for s in servers:
        s.close()


@pytest.mark.timeout(180)
def test_two_replicas_split_the_cameras_and_the_client_routes_to_the_owner(replicas):
    with ShardedClient([s.address for s in replicas]) as fleet:
        fleet.wait_ready(60)
        listed = [{s.stream_id for s in c.list_streams()} for c in fleet.clients]
        assert listed[0].isdisjoint(listed[1]) and listed[0] | listed[1] == set(CAMS)
        assert all(owner(sid, 2) == i for i, ids in enumerate(listed) for sid in ids)
        assert [s.stream_id for s in fleet.list_streams()] == sorted(CAMS)

        # the wrong replica refuses a camera it does not own, naming the owner
        new = next(f"extra{i}" for i in range(100) if owner(f"extra{i}", 2) == 1)
        with pytest.raises(grpc.RpcError) as e:
            fleet.clients[0].add_stream(new, "synthetic://x?fps=3&size=320x180")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "shard 1 of 2" in e.value.details()
        for call in (lambda: fleet.clients[0].remove_stream(new), lambda: next(iter(fleet.clients[0].watch([new])))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()

        # the client sends it to the owner, and a watch over cameras of both replicas merges their results
        assert fleet.add_stream(new, "synthetic://x?fps=3&size=320x180").stream_id == new
        assert fleet.stream(new) is not None and fleet.clients[0].stream(new) is None
        watched = [new, *(sorted(listed[0])[:1])]
        watch = fleet.watch(watched)
        seen: set[str] = set()
        try:
            for fd in watch:
                seen.add(fd.stream_id)
                if seen == set(watched):
                    break
        finally:
            watch.cancel()
        assert fleet.remove_stream(new).stream_id == new
        wait_until(lambda: fleet.stream(new) is None, 10, what="stream removed")


@pytest.mark.timeout(180)
def test_ctl_routes_cameras_to_their_replica_and_lists_them_all(replicas):
    from yolov12_serve import ctl

    fleet = [arg for s in replicas for arg in ("--server", s.address)]
    new = next(f"ctl{i}" for i in range(100) if owner(f"ctl{i}", 2) == 1)
    out = io.StringIO()
    with ShardedClient([s.address for s in replicas]) as direct:
        direct.wait_ready(60)
        assert ctl.main([*fleet, "add", new, "synthetic://x?fps=3&size=320x180"], out) == 0
        assert direct.clients[1].stream(new) is not None and direct.clients[0].stream(new) is None
    out = io.StringIO()
    assert ctl.main([*fleet, "--json", "streams"], out) == 0
    assert sorted(json.loads(line)["stream_id"] for line in out.getvalue().splitlines()) == sorted([*CAMS, new])
    out = io.StringIO()
    assert ctl.main([*fleet, "health"], out) == 0
    assert out.getvalue() == "".join(f"{s.address}: SERVING\n" for s in replicas)
    assert ctl.main([*fleet, "remove", new], io.StringIO()) == 0


@pytest.mark.timeout(180)
def test_a_followed_fleet_watch_goes_on_when_a_replica_goes_away(replicas):
    """(Runs last: it stops replica 1.) A followed watch of every camera keeps the other replica's results coming
    and tells, naming the replica, that one went away; the reader sees no error, and ends when cancelled."""
    told: list[str] = []
    seen: list[str] = []
    ended: list[object] = []
    with ShardedClient([s.address for s in replicas]) as fleet:
        fleet.wait_ready(60)
        held = [{s.stream_id for s in c.list_streams()} for c in fleet.clients]
        watch = fleet.watch(follow=True, on_gap=told.append)

        def read() -> None:
            try:
                seen.extend(fd.stream_id for fd in watch)
                ended.append("end")
            except grpc.RpcError as e:
                ended.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: all(ids & set(seen) for ids in held), 30, what="results of both replicas")
        replicas[1].close()
        wait_until(lambda: told, 20, what="the gap told")
        assert told[0].startswith(f"{replicas[1].address}: watch interrupted ("), told
        after = len(seen)
        wait_until(lambda: len(held[0] & set(seen[after:])) >= 2, 30, what="replica 0's results after the gap")
        watch.cancel()
        reader.join(10)
    assert ended == ["end"] and len(told) == 1, (ended, told)
