"""The served API through FastAPI's TestClient, on a real registry (see serving_world.py)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from serving_world import NAME, PROFILE_USER, add_item, move_champion

from app.api import create_app
from llmrec.config import ApiConfig, Compression
from llmrec.ingest import read_catalog_texts
from llmrec.keys import KeyStore, keys_file
from llmrec.scoring import Scorer
from llmrec.serving import ChampionFollower


def make_client(world, compression: Compression = Compression(), **config) -> TestClient:
    api_config = ApiConfig(home=str(world.home.root), poll_seconds=3600, compression=compression, **config)
    follower = ChampionFollower(world.home, NAME, compression, encoder_loader=world.encoder_loader)
    return TestClient(create_app(api_config, follower))


@pytest.fixture
def keys(served_home):
    store = KeyStore(keys_file(served_home.home.root))
    return {"read": {"X-API-Key": store.create("reader", "read")},
            "admin": {"X-API-Key": store.create("operator", "admin")}, "store": store}


def top(client, headers, user, k=10, **params):
    response = client.get(f"/v1/users/{user}/recommendations", params={"k": k, **params}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_recommendations_name_version_and_how_the_user_was_scored(served_home, keys):
    world = served_home
    with make_client(world) as client:
        history = top(client, keys["read"], "u0", k=5)
        profile = top(client, keys["read"], PROFILE_USER, k=5)
        stranger = top(client, keys["read"], "nobody", k=5)
    assert (history["version"], history["scored_by"]) == ("1", "history")
    assert profile["scored_by"] == "profile" and stranger["scored_by"] == "popular"
    assert [len(r["items"]) for r in (history, profile, stranger)] == [5, 5, 5]
    # The same ranking and scores as the one scorer, rated items excluded.
    scorer = Scorer.load(world.folders["1"])
    rated = world.events.loc[world.events["user_id"] == "u0", ["user_id", "item_id"]]
    expected = scorer.top_k(["u0"], 5, exclude=rated)
    assert [i["item_id"] for i in history["items"]] == expected["item_id"].tolist()
    assert np.allclose([i["score"] for i in history["items"]], expected["score"])
    assert not {i["item_id"] for i in history["items"]} & set(rated["item_id"])
    # u0 likes action (items i % 4 == 0); the profile user's text says "fan of action".
    assert all(int(i["item_id"][1:]) % 4 == 0 for i in history["items"])
    assert sum(int(i["item_id"][1:]) % 4 == 0 for i in profile["items"]) >= 3
    # Popular: most rated first.
    counts = world.events["item_id"].value_counts()
    assert [i["item_id"] for i in stranger["items"]] == sorted(counts.index, key=lambda i: (-counts[i], i))[:5]


def test_rated_items_come_back_when_exclusion_is_off(served_home, keys):
    with make_client(served_home) as client:
        kept = top(client, keys["read"], "u0", k=30, exclude_rated="false")
    rated = set(served_home.events.loc[served_home.events["user_id"] == "u0", "item_id"])
    assert {i["item_id"] for i in kept["items"]} & rated


def test_batch_recommendations_and_scores(served_home, keys):
    world = served_home
    with make_client(world) as client:
        batch = client.post("/v1/recommendations", json={"user_ids": ["u1", "nobody", "u1"], "k": 3},
                            headers=keys["read"])
        pairs = [{"user_id": "u1", "item_id": "i1"}, {"user_id": "u2", "item_id": "i3"},
                 {"user_id": "nobody", "item_id": "unknown-item"}]
        scored = client.post("/v1/scores", json={"pairs": pairs}, headers=keys["read"])
        single = top(client, keys["read"], "u1", k=3)
    assert batch.status_code == 200 and scored.status_code == 200
    results = batch.json()["results"]
    assert [r["scored_by"] for r in results] == ["history", "popular", "history"]
    assert results[0]["items"] == single["items"] == results[2]["items"]
    body = scored.json()
    expected = Scorer.load(world.folders["1"]).predict(["u1", "u2", "nobody"], ["i1", "i3", "unknown-item"])
    assert body["version"] == "1" and np.allclose(body["scores"], expected)


def test_item_added_after_training_is_scored_from_its_text_not_the_mean(served_home, keys):
    world = served_home
    add_item(world.home, "i_new", "film new; genres: action")
    with make_client(world) as client:
        served = client.post("/v1/scores", json={"pairs": [{"user_id": "u0", "item_id": "i_new"},
                                                          {"user_id": "u1", "item_id": "i_new"}]},
                             headers=keys["read"]).json()["scores"]
        recommended = top(client, keys["read"], "u0", k=60)
        ready = client.get("/readyz", headers=keys["read"]).json()
    assert ready["cold_start_items"] == 1
    stored = Scorer.load(world.folders["1"])
    as_mean = stored.predict(["u0", "u1"], ["i_new", "i_new"])
    # The champion's towers over the new item's text, computed here independently.
    texts = read_catalog_texts(world.home)
    from_text = Scorer.from_checkpoint(world.checkpoints["1"], world.cache(), texts).predict(["u0", "u1"], ["i_new", "i_new"])
    assert np.allclose(served, from_text, atol=1e-5)
    assert not np.allclose(served, as_mean, atol=1e-2)
    # An action fan ranks the new action film above the mean-scored position it would get.
    assert served[0] > as_mean[0]
    assert "i_new" in [i["item_id"] for i in recommended["items"]]


@pytest.mark.parametrize("method,path,payload,field,rule", [
    ("get", "/v1/users/u0/recommendations?k=0", None, "query.k", "greater_than_equal"),
    ("get", "/v1/users/u0/recommendations?k=1001", None, "query.k", "less_than_equal"),
    ("get", "/v1/users/u0/recommendations?k=ten", None, "query.k", "int_parsing"),
    ("get", "/v1/users/u0/recommendations?exclude_rated=maybe", None, "query.exclude_rated", "bool_parsing"),
    ("post", "/v1/scores", {"pairs": [{"user_id": "u0", "item_id": "i1"}] * 11}, "body.pairs", "too_long"),
    ("post", "/v1/scores", {"pairs": []}, "body.pairs", "too_short"),
    ("post", "/v1/scores", {"pairs": "u0,i1"}, "body.pairs", "list_type"),
    ("post", "/v1/scores", {"pairs": [{"user_id": 7, "item_id": "i1"}]}, "body.pairs.0.user_id", "string_type"),
    ("post", "/v1/scores", {"pairs": [{"user_id": "u0"}]}, "body.pairs.0.item_id", "missing"),
    ("post", "/v1/scores", b'{"pairs": [', "body.11", "json_invalid"),
    ("post", "/v1/recommendations", {"user_ids": ["u0"], "k": 5000}, "body.k", "less_than_equal"),
    ("post", "/v1/recommendations", {"user_ids": ["u0"], "top": 5}, "body.top", "extra_forbidden"),
    ("post", "/v1/recommendations", {"user_ids": ["u"] * 6}, "body.user_ids", "too_long"),
])
def test_bad_requests_get_a_4xx_naming_field_and_rule(served_home, keys, method, path, payload, field, rule):
    with make_client(served_home, max_pairs=10, max_users=5) as client:
        kwargs = {"headers": {**keys["read"], "content-type": "application/json"}}
        if payload is not None:
            kwargs["content" if isinstance(payload, bytes) else "json"] = payload
        response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 422, response.text
    problems = response.json()["error"]["problems"]
    assert any(p["field"] == field and p["rule"] == rule for p in problems), problems
    assert "Traceback" not in response.text


def test_every_auth_case(served_home, keys, caplog):
    caplog.set_level(logging.DEBUG)
    store = keys["store"]
    read_key = keys["read"]["X-API-Key"]
    with make_client(served_home) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/v1/users/u0/recommendations", "/docs", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 401 and "missing API key" in response.json()["error"]["message"]
        assert client.get("/readyz", headers={"X-API-Key": read_key + "x"}).status_code == 401
        assert client.get("/readyz", headers={"X-API-Key": "llmrec_nope_nope"}).status_code == 401
        assert client.get("/readyz", headers={"X-API-Key": "garbage"}).status_code == 401
        assert client.get("/readyz", headers={"Authorization": f"Bearer {read_key}"}).status_code == 200
        assert client.get("/readyz", headers={"Authorization": f"Basic {read_key}"}).status_code == 401
        docs = client.get("/docs", headers=keys["read"])
        assert docs.status_code == 200 and "/v1/users/{user_id}/recommendations" in docs.text
        schema = client.get("/openapi.json", headers=keys["read"]).json()
        assert {"/v1/scores", "/v1/recommendations", "/v1/admin/reload"} <= set(schema["paths"])
        assert client.post("/v1/scores", json={"pairs": [{"user_id": "u0", "item_id": "i0"}]}).status_code == 401
        denied = client.post("/v1/admin/reload", headers=keys["read"])
        assert denied.status_code == 403 and "admin" in denied.json()["error"]["message"]
        assert client.post("/v1/admin/reload", headers=keys["admin"]).status_code == 200
        assert client.get("/v1/users/u0/recommendations", headers=keys["admin"]).status_code == 200
        store.revoke("reader")
        revoked = client.get("/readyz", headers=keys["read"])
        assert revoked.status_code == 401 and revoked.json() == {
            "error": {"status": 401, "message": "invalid or revoked API key"}}
    assert read_key not in caplog.text and keys["admin"]["X-API-Key"] not in caplog.text


def test_hot_swap_under_concurrent_requests(served_home, keys):
    """Requests keep coming while the alias moves 1 -> 2 -> 1 -> 2: every response is 200 and
    carries one version whose scores are exactly that version's (never a mix)."""
    world = served_home
    expected = {v: Scorer.load(world.folders[v]).predict(["u3", "u5"], ["i3", "i7"]) for v in ("1", "2")}
    assert not np.allclose(expected["1"], expected["2"])
    seen, problems = [], []
    stop = threading.Event()
    with make_client(world) as client:
        follower = client.app.state.follower

        def hammer():
            while not stop.is_set():
                response = client.post("/v1/scores", json={"pairs": [{"user_id": "u3", "item_id": "i3"},
                                                                      {"user_id": "u5", "item_id": "i7"}]},
                                       headers=keys["read"])
                if response.status_code != 200:
                    problems.append(response.text)
                    continue
                body = response.json()
                seen.append(body["version"])
                if not np.allclose(body["scores"], expected[body["version"]], atol=1e-6):
                    problems.append(body)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            for version in ("2", "1", "2"):
                move_champion(version)
                assert follower.check().status == "loaded"
                assert follower.current.version == version
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert not problems
    assert set(seen) == {"1", "2"} and len(seen) > 20


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(served_home, keys):
    with make_client(served_home) as client:
        follower = client.app.state.follower
        move_champion("3")
        outcome = follower.check()
        assert outcome.status == "failed" and "version 3" in outcome.error
        # Not retried on every poll, only when asked.
        assert follower.check().status == "unchanged"
        ready = client.get("/readyz", headers=keys["read"])
        assert ready.status_code == 200
        assert ready.json()["version"] == "1" and ready.json()["champion_alias"] == "3"
        assert "version 3 failed to load" in ready.json()["reload_error"]
        assert top(client, keys["read"], "u0")["version"] == "1"
        metrics = client.get("/metrics", headers=keys["read"]).text
        assert "llmrec_api_reload_failing 1.0" in metrics and "llmrec_api_served_version 1.0" in metrics
        forced = client.post("/v1/admin/reload", headers=keys["admin"])
        assert forced.status_code == 502 and forced.json()["version"] == "1"
        move_champion("2")
        assert client.post("/v1/admin/reload", headers=keys["admin"]).json()["version"] == "2"
        ready = client.get("/readyz", headers=keys["read"]).json()
        assert ready["version"] == "2" and ready["reload_error"] is None
        assert "llmrec_api_reload_failing 0.0" in client.get("/metrics", headers=keys["read"]).text


def test_metrics_count_requests_by_route_and_status(served_home, keys):
    with make_client(served_home) as client:
        before = client.get("/metrics", headers=keys["read"]).text
        top(client, keys["read"], "nobody", k=2)
        client.get("/v1/users/u0/recommendations?k=0", headers=keys["read"])
        after = client.get("/metrics", headers=keys["read"]).text

    def value(text, needle):
        lines = [line for line in text.splitlines() if line.startswith(needle)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    route = 'route="/v1/users/{user_id}/recommendations"'
    ok = f'llmrec_api_requests_total{{method="GET",{route},status="200"}}'
    bad = f'llmrec_api_requests_total{{method="GET",{route},status="422"}}'
    hist = f'llmrec_api_request_seconds_count{{method="GET",{route},status="200"}}'
    popular = 'llmrec_api_cold_start_users_total{scored_by="popular"}'
    for needle in (ok, bad, hist, popular):
        assert value(after, needle) == value(before, needle) + 1, needle
    assert "llmrec_api_reloads_total" in after and "llmrec_api_served_version" in after


def test_int8_serving_path(served_home, keys):
    world = served_home
    add_item(world.home, "i_new", "film new; genres: action")
    with make_client(world) as fp32_client:
        fp32 = [top(fp32_client, keys["read"], f"u{u}", k=10) for u in range(8)]
        fp32_new = fp32_client.post("/v1/scores", json={"pairs": [{"user_id": "u0", "item_id": "i_new"}]},
                                    headers=keys["read"]).json()["scores"][0]
    with make_client(world, Compression(quantize="int8")) as client:
        model = client.app.state.follower.current
        assert model.scorer.item_vectors.dtype == torch.int8 and model.scorer.item_scale is not None
        encoder = client.app.state.follower.text_path.encoders(str(world.encoder_dir))[1]
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in encoder.model.modules())
        int8 = [top(client, keys["read"], f"u{u}", k=10) for u in range(8)]
        int8_new = client.post("/v1/scores", json={"pairs": [{"user_id": "u0", "item_id": "i_new"}]},
                               headers=keys["read"]).json()["scores"][0]
    overlap = np.mean([len({i["item_id"] for i in a["items"]} & {i["item_id"] for i in b["items"]}) / 10
                       for a, b in zip(fp32, int8)])
    assert overlap >= 0.9
    assert max(abs(i["score"] - j["score"]) for a, b in zip(fp32, int8) for i, j in zip(a["items"], b["items"])) < 0.05
    # The new item went through the int8 encoder: close to fp32, not identical.
    assert int8_new != fp32_new and abs(int8_new - fp32_new) < 0.25


def test_pyfunc_returns_the_same_top_k_as_the_api(served_home, keys):
    import mlflow

    users = ["u0", "u7", PROFILE_USER, "nobody-at-all"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = pyfunc.predict(pd.DataFrame({"user_id": users}), params={"k": 7})
    with make_client(served_home) as client:
        for user in users[:3]:
            api = top(client, keys["read"], user, k=7, exclude_rated="false")
            mine = frame[frame["user_id"] == user]
            assert [i["item_id"] for i in api["items"]] == mine["item_id"].tolist()
            assert np.allclose([i["score"] for i in api["items"]], mine["score"], atol=1e-6)
    assert len(frame[frame["user_id"] == "nobody-at-all"]) == 7  # ranked as the unknown user
    pairs = pyfunc.predict(pd.DataFrame({"user_id": ["u0"], "item_id": ["i0"]}))
    assert np.allclose(pairs["prediction"], Scorer.load(served_home.folders["1"]).predict(["u0"], ["i0"]))


def test_no_champion_yet_is_503_not_500(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from llmrec.config import Home
    from llmrec.registry import configure

    home = Home(tmp_path / "empty")
    configure(home, "llmrec")
    KeyStore(keys_file(home.root)).create("r", "read")
    key = KeyStore(keys_file(home.root)).create("r2", "read")
    config = ApiConfig(home=str(home.root), poll_seconds=3600)
    with TestClient(create_app(config, ChampionFollower(home, NAME))) as client:
        assert client.get("/readyz", headers={"X-API-Key": key}).status_code == 503
        response = client.get("/v1/users/u0/recommendations", headers={"X-API-Key": key})
    assert response.status_code == 503 and "champion" in response.json()["error"]["message"]
