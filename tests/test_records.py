"""Raw records mean what they say: symbolic values matched by value whatever JSON type a
client sends, and every value a model does not know (an unseen category, a wrong type, a
number that does not fit float32 or lies far outside the training range) refused with a
422 naming it, or, under a model's `anomaly` policy, scored, flagged and explained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from gansentry.manifest import Manifest, TabularPreprocessing
from gansentry.preprocessing import (
    RANGE_LIMIT,
    InputError,
    category_key,
    encode_columns,
    encode_record,
    fit_tabular,
    screen_record,
)
from tests.fixtures_models import TABULAR_MODEL, ModelRepo, add_version, metric, serving
from tests.test_service_process import gansentry_serve, wait_ready

SHIPPED = Path(__file__).resolve().parents[1] / "models"
KDD_MODEL = "kdd-egbad"
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
FLAGS = ("land", "logged_in", "is_host_login", "is_guest_login")


def kdd_record(name: str = "kdd-normal-traffic.json") -> dict:
    return json.loads((EXAMPLES / name).read_text())["record"]


def with_policy(repo: Path, name: str, version: int, policy: str) -> Path:
    """Publish `name` version+1 as a copy of `version` whose manifest sets `policy`."""
    dest = add_version(repo, name, version, version + 1)
    m = Manifest.load(dest)
    prep = m.input.preprocessing.model_copy(update={"unknown_policy": policy})
    m.model_copy(update={"input": m.input.model_copy(update={"preprocessing": prep})}).save(dest)
    return dest


# ---------------------------------------------------------------- matching by value


def test_numbers_strings_and_booleans_match_the_same_category() -> None:
    prep = fit_tabular(
        {"flag": ["0", "1", "1"], "word": ["false", "true", "true"], "n": [0.0, 1.0, 2.0]},
        symbolic=["flag", "word"],
    )
    assert prep.columns[0].vocabulary == ["0", "1"]
    assert prep.columns[1].vocabulary == ["false", "true"]
    want = encode_record({"flag": "1", "word": "true", "n": 1.0}, prep)
    for one in ("1", 1, 1.0, True, "1.0", "true", "TRUE", np.int64(1), np.float32(1.0)):
        got = encode_record({"flag": one, "word": one, "n": 1}, prep)
        np.testing.assert_array_equal(got, want, err_msg=repr(one))
    zero = encode_record({"flag": False, "word": 0, "n": 1}, prep)
    np.testing.assert_array_equal(zero[:4], [1, 0, 1, 0])
    # The dataset path (training, evaluate) encodes the same values the same way.
    cols = {"flag": [1.0, "1", True], "word": ["true", 1, True], "n": [1, 1, 1]}
    np.testing.assert_array_equal(encode_columns(cols, prep), np.stack([want] * 3))


def test_canonical_keys_and_fitted_vocabularies() -> None:
    assert category_key(1) == category_key(1.0) == category_key("1") == category_key(True)
    assert category_key("1.50") == category_key(1.5) != category_key(1)
    assert category_key("tcp") != category_key("TCP")
    assert category_key(None) is None and category_key(float("nan")) is None
    assert category_key([1]) is None
    assert category_key("1" + "0" * 400) == category_key(10**400)
    # One category per value however the training data wrote it; numbers without ".0".
    prep = fit_tabular({"c": [1, 1.0, "1", 2.5, "x"], "n": [0, 1, 2, 3, 4]}, symbolic=["c"])
    assert prep.columns[0].vocabulary == ["1", "2.5", "x"]


def test_text_that_is_an_entry_matches_it_exactly() -> None:
    """A vocabulary holding both "01" and "1" keeps them apart for text; a number means
    the entry written as that number."""
    prep = fit_tabular({"zip": ["01", "1", "7"], "n": [0.0, 1.0, 2.0]}, symbolic=["zip"])
    assert prep.columns[0].vocabulary == ["01", "1", "7"]
    assert encode_record({"zip": "01", "n": 0}, prep)[:3].tolist() == [1, 0, 0]
    assert encode_record({"zip": 1, "n": 0}, prep)[:3].tolist() == [0, 1, 0]
    assert encode_record({"zip": "7.0", "n": 0}, prep)[:3].tolist() == [0, 0, 1]


def test_shipped_kdd_manifests_load_and_encode_numbers_as_their_strings() -> None:
    """The shipped vocabularies hold "0"/"1" for KDD's flags: a flow collector's numbers
    must encode exactly as the training file's text did (they encoded as unseen before)."""
    for version in (1, 2):
        m = Manifest.load(SHIPPED / KDD_MODEL / str(version))
        prep = m.input.preprocessing
        assert prep is not None and prep.unknown_policy == "reject"
        as_numbers = kdd_record()
        assert all(type(as_numbers[f]) is int for f in FLAGS)  # the README's example
        as_text = {**as_numbers, **{f: str(as_numbers[f]) for f in FLAGS}}
        as_floats = {**as_numbers, **{f: float(as_numbers[f]) for f in FLAGS}}
        x = encode_record(as_numbers, prep)
        np.testing.assert_array_equal(x, encode_record(as_text, prep))
        np.testing.assert_array_equal(x, encode_record(as_floats, prep))
        names = prep.feature_names()
        assert x[names.index("logged_in=1")] == 1.0 and x[names.index("land=0")] == 1.0
        cols = {k: [v] for k, v in as_text.items()}
        np.testing.assert_array_equal(x, encode_columns(cols, prep)[0])


# ---------------------------------------------------------------- screening values


def test_screening_names_field_and_value_and_bounds_the_features() -> None:
    prep = Manifest.load(SHIPPED / KDD_MODEL / "2").input.preprocessing
    rec = kdd_record()
    cases = {
        "protocol_type": ("sctp", "unknown_category", '"sctp" is not a category seen'),
        "logged_in": (0.5, "unknown_category", "0.5 is not a category seen"),
        "land": (None, "wrong_type", "null is not a category"),
        "flag": ({"a": 1}, "wrong_type", "is not a category"),
        "count": (1e300, "out_of_range", "1e+300 does not fit in a 32-bit float"),
        "src_bytes": (1e30, "out_of_range", "training ranges outside the training range [0,"),
        "duration": (10**400, "out_of_range", "about 401 digits> does not fit"),
        "dst_bytes": (-1e15, "out_of_range", "outside the training range"),
    }
    for field, (value, kind, text) in cases.items():
        screened = screen_record({**rec, field: value}, prep)
        assert [(p.field, p.kind) for p in screened.problems] == [(field, kind)], field
        assert f"field {field!r} = " in screened.reason and text in screened.reason
        assert np.isfinite(screened.x).all()
        assert screened.x.min() >= -RANGE_LIMIT and screened.x.max() <= 1 + RANGE_LIMIT
        with pytest.raises(InputError, match=f"field '{field}' = "):
            screened.verdict("reject")
        assert screened.verdict("anomaly") == screened.reason
    # Moderately out of range is normal in production and stays data: KDD's own held-out
    # half reaches 23 training ranges.
    src = prep.feature_names().index("src_bytes")
    big = 50 * (prep.offset[src] + prep.scale[src])
    assert screen_record({**rec, "src_bytes": big}, prep).problems == ()
    # What no policy can score stays a plain error.
    without_count = {k: v for k, v in rec.items() if k != "count"}
    for bad, text in (
        ({**rec, "count": "12"}, "must be a number, got str"),
        ({**rec, "count": float("nan")}, "NaN"),
        ({**rec, "colour": 1}, "unknown field"),
        (without_count, "missing field 'count'"),
    ):
        with pytest.raises(InputError, match=text):
            screen_record(bad, prep)


def test_old_manifests_without_a_policy_mean_reject() -> None:
    raw = json.loads((SHIPPED / KDD_MODEL / "2" / "manifest.json").read_text())
    prep = raw["input"]["preprocessing"]
    assert "unknown_policy" not in prep
    assert TabularPreprocessing.model_validate(prep).unknown_policy == "reject"
    with pytest.raises(ValueError, match="unknown_policy"):
        TabularPreprocessing.model_validate({**prep, "unknown_policy": "ignore"})


# ---------------------------------------------------------------- through the service


async def test_unseen_categories_under_both_policies(mutable_repo: ModelRepo) -> None:
    with_policy(mutable_repo.root, TABULAR_MODEL, 1, "anomaly")  # traffic/2
    good = {"duration": 2.5, "protocol": "udp", "bytes": 1200}
    unseen = {**good, "protocol": "sctp"}
    far = {**good, "bytes": 5000 * (RANGE_LIMIT + 2)}
    before = metric(
        "gansentry_unexpected_values_total",
        model=TABULAR_MODEL,
        field="protocol",
        kind="unknown_category",
    )
    async with serving(mutable_repo.root) as served:
        r = await served.client.post(
            "/score",
            json={
                "model": TABULAR_MODEL,
                "version": 1,
                "inputs": [{"record": good}] * 2 + [{"record": unseen}, {"record": far}],
            },  # fmt: skip
        )
        assert r.status_code == 422
        errors = r.json()["errors"]
        assert errors[0] == (
            "inputs[2]: field 'protocol' = \"sctp\" is not a category seen in training "
            "(icmp, tcp, udp)"
        )
        assert errors[1].startswith("inputs[3]: field 'bytes' = 5010000 lies ")

        r = await served.client.post(
            "/score",
            json={
                "model": TABULAR_MODEL,
                "version": 2,
                "inputs": [{"record": good}, {"record": unseen}, {"record": far}],
            },  # fmt: skip
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert "reason" not in results[0]
        assert results[1]["is_anomaly"] is True
        assert results[1]["reason"].startswith("field 'protocol' = \"sctp\" is not a category")
        assert results[2]["is_anomaly"] is True and "'bytes' = 5010000" in results[2]["reason"]
        # Scored as the policy says: the unseen category as all zeros, the far value at
        # the limit, both finite.
        prep = served.registry.get(TABULAR_MODEL, 2).manifest.input.preprocessing
        x = np.stack([screen_record(rec, prep).x for rec in (good, unseen, far)])
        assert x[1, 1:4].tolist() == [0, 0, 0] and x[2, -1] == pytest.approx(1 + RANGE_LIMIT)
        scores, _ = served.registry.get(TABULAR_MODEL, 2).run(x)
        np.testing.assert_allclose([res["score"] for res in results], scores, rtol=1e-5)
        assert results[0]["is_anomaly"] == bool(scores[0] > r.json()["threshold"])
    after = metric(
        "gansentry_unexpected_values_total",
        model=TABULAR_MODEL,
        field="protocol",
        kind="unknown_category",
    )
    assert after - before == 2


def test_issue18_out_of_range_records_over_real_http(tmp_path: Path) -> None:
    """The reproductions from issue 18 on the shipped kdd-egbad: 1e300 and 1e30 used to
    answer NaN/Infinity as "normal", and a 401-digit integer a 500 that dropped the
    keep-alive connection. Version 3 is version 2 under the `anomaly` policy."""
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED / KDD_MODEL / "2", repo / KDD_MODEL / "2")
    with_policy(repo, KDD_MODEL, 2, "anomaly")
    rec = kdd_record()
    body = '{"model": "kdd-egbad", "version": %d, "inputs": [{"record": %s}]}'
    huge = json.dumps(rec).replace('"duration": 0,', '"duration": 1' + "0" * 400 + ",")
    assert len(huge) > len(json.dumps(rec)) + 300
    log = tmp_path / "serve.log"
    with gansentry_serve(repo, log) as (proc, url), httpx.Client(base_url=url, timeout=30) as c:
        wait_ready(proc, url, log)
        post = lambda v, record_json: c.post(  # noqa: E731
            "/score", content=body % (v, record_json), headers={"content-type": "application/json"}
        )
        cases = [
            (json.dumps({**rec, "count": 1e300}), "field 'count' = 1e+300 does not fit"),
            (json.dumps({**rec, "src_bytes": 1e30}), "field 'src_bytes' = 1e+30 lies 1.44e+21"),
            (huge, "field 'duration' = <an integer of about 401 digits> does not fit"),
        ]
        for record_json, text in cases:
            r = post(2, record_json)
            assert r.status_code == 422, r.text
            assert r.json()["detail"].startswith(f"inputs[0]: {text}")
            # The same keep-alive connection goes on working.
            ok = post(2, json.dumps(rec))
            assert ok.status_code == 200 and ok.headers.get("connection") != "close"
            r = post(3, record_json)
            assert r.status_code == 200, r.text
            (result,) = r.json()["results"]
            assert result["is_anomaly"] is True and result["reason"].startswith(text)
            assert np.isfinite(result["score"])
        # Numbers as numbers score exactly as the training file's text.
        as_text = {**rec, **{f: str(rec[f]) for f in FLAGS}}
        a, b = post(2, json.dumps(rec)).json(), post(2, json.dumps(as_text)).json()
        assert a["results"] == b["results"]
    assert "Traceback" not in log.read_text()


def test_shipped_kdd_graphs_stay_finite_at_the_range_limit() -> None:
    """Whatever passes the checks (or is clipped to the limit under `anomaly`) keeps every
    shipped KDD graph finite: all numeric features at the limit, both signs and mixed."""
    from service.registry import load_model
    from service.settings import Settings

    for version_dir in sorted(SHIPPED.glob("kdd-*/*")):
        model = load_model(version_dir, Settings(providers="cpu"))
        prep = model.manifest.input.preprocessing
        numeric = [i for i, f in enumerate(prep.feature_names()) if "=" not in f]
        x = np.zeros((3, prep.num_features), dtype=np.float32)
        x[0, numeric] = 1 + RANGE_LIMIT
        x[1, numeric] = -RANGE_LIMIT
        x[2, numeric] = np.where(np.arange(len(numeric)) % 2, 1 + RANGE_LIMIT, -RANGE_LIMIT)
        scores, recon = model.run(x)
        assert np.isfinite(scores).all(), version_dir
        # A model without reconstructions (MMOC-GAN) answers only scores.
        assert recon is None or np.isfinite(recon).all(), version_dir
