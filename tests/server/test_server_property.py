"""Property-based (hypothesis): generated metadata, tags, names, sources and query values (deep nesting, huge
strings, control characters, unicode, lone surrogates inside JSON) go through both upload routes as a writer of
every namespace;
then other users (anonymous, a reader of another namespace, an admin) list and search with generated query
values. Nothing ever answers 5xx, a refused upload leaves versions, blobs and temp files exactly as they were,
and every stored document is within the limits. On SQLite and PostgreSQL; derandomized and bounded (about 10 s
per database on 2 cores)."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings, strategies as st

from weightlab.registry.schemas import check_json

EXAMPLES = 25

# Characters that are hard on parsers, logs and databases, next to ordinary and non-Latin ones (no lone
# surrogates outside JSON: an HTTP client cannot send them, and servers receive U+FFFD instead).
_ODD = st.sampled_from(["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u202e", "\ufeff", "%", "/", "\\", "'", '"', ".",
                        "\U0001F600", "é", "ß", "日", " "])
_TEXT = st.text(st.characters(exclude_categories=("Cs",)) | _ODD, max_size=40)
_HUGE = st.integers(0, 20_000).map(lambda n: "x" * n)  # the whole query stays within what httpx sends
_VALID = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,20}", fullmatch=True)
_JUNK = _TEXT.map(lambda t: "ok" + t)  # valid, then anything ("ok\n")
_LABELISH = st.one_of(_VALID, _TEXT, _JUNK)
_MOSTLY_VALID = st.one_of(_VALID, _VALID, _VALID, _VALID, _TEXT, _JUNK)  # so the other parameters get parsed, often


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


_JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _TEXT
              | st.sampled_from(["\ud800", "x" * 9000]))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_TEXT | st.just("k" * 300), inner, max_size=4), max_leaves=30)
_METADATA = st.one_of(
    st.none(),
    st.dictionaries(_TEXT, _JSON, max_size=5).map(json.dumps),  # json.dumps escapes lone surrogates as \\ud800
    st.integers(1, 3000).map(_nested),  # deep: RecursionError territory at ~1000, pydantic's limit at ~250
    _JSON.map(json.dumps), _TEXT, _HUGE.map(lambda s: json.dumps({"a": s})),
)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(folder=st.sampled_from([False, False, False, True]), namespace=_MOSTLY_VALID, name=_MOSTLY_VALID,
       tags=st.lists(_MOSTLY_VALID, max_size=2), metadata=_METADATA,
       source=st.one_of(st.none(), st.none(), st.none(), _TEXT, st.integers(2000, 2100).map(lambda n: "s" * n)),
       query=st.dictionaries(st.sampled_from(["text", "tag", "family", "namespace", "kind", "limit", "offset"]),
                             st.one_of(_LABELISH, _HUGE), max_size=3))
def _scenario(live, data, tokens, folder, namespace, name, tags, metadata, source, query):
    before = live.snapshot()
    params = {"sha256": hashlib.sha256(data).hexdigest(), "tag": tags, "metadata": metadata, "source": source}
    params = {k: v for k, v in params.items() if v is not None}
    route, body, ctype = ("folders", b"", "application/x-tar") if folder else \
        ("versions", data, "application/octet-stream")
    with live.http(tokens["writer"]) as http:
        r = http.post(f"/artifacts/{quote(namespace, safe='')}/{quote(name, safe='')}/{route}", params=params,
                      content=body, headers={"content-type": ctype})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert live.snapshot() == before, f"a refused upload ({r.status_code}) changed the registry"
    elif metadata is not None:
        assert r.json()["metadata"] == json.loads(metadata)
    for who, all_versions in (("anonymous", "false"), ("other", "true"), ("admin", "true")):
        with live.http(tokens[who]) as http:
            for path, q in (("/versions", {**query, "all_versions": all_versions}),
                            (f"/artifacts/{quote(namespace, safe='')}/{quote(name, safe='')}/versions", {})):
                got = http.get(path, params=q)
                assert got.status_code < 500, (who, path, q, got.text)
    for v in live.registry.search(all_versions=True):  # what was stored is what any reader can serialise
        check_json(v.metadata)


def test_generated_uploads_then_listings_never_fail_and_refusals_change_nothing(db_url, serve, tiny):
    live = serve(db_url, job_workers=0)
    live.registry.add(tiny.style_lora_kohya, name="other/style")
    tokens = {"writer": live.token("*", "write"), "other": live.token("other", "read"), "anonymous": None,
              "admin": live.admin}
    _scenario(live, tiny.style_lora_kohya.read_bytes(), tokens)
