"""The registry contract: the local Registry and the HTTP Client both keep RegistryProtocol.

Every test here runs the same calls and the same assertions on a local ``Registry`` (with a job worker thread, as a
server runs) and on a ``Client`` talking to a real server on loopback (``serve`` in conftest.py, admin token for
``*``), on SQLite and PostgreSQL. The results are compared with values written in the test (refs, kinds, fields),
never with what the other side returned, so each side can fail on its own. (Here rather than in tests/registry:
the server fixtures live in this folder.)
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab.errors import DuplicateVersionError, JobSpecError, NotFoundError, UnmatchedKeysError
from weightlab.recipe import Recipe, Term
from weightlab.registry.client import Client
from weightlab.registry.contract import RegistryProtocol
from weightlab.registry.schemas import Derivation, LineageInput, NamespacePublic
from weightlab.registry.service import Registry


@pytest.fixture(params=["Registry", "Client"])
def registry(request, db_url, serve, home):
    """A local Registry with a job worker, or a Client of a server over the same kind of database."""
    if request.param == "Client":
        live = serve(db_url)
        with live.client(live.admin) as client:
            yield client
        return
    from weightlab.registry.jobs import Worker

    reg = Registry(db_url, home=home)
    stop = threading.Event()
    worker = threading.Thread(target=Worker(reg, poll_seconds=0.05).run, args=(stop,), daemon=True)
    worker.start()
    yield reg
    stop.set()
    worker.join(timeout=30)
    reg.close()


def test_versions_and_labels(registry, tiny, tmp_path):
    v = registry.add(tiny.style_lora_kohya, name="me/style", tags=["anime"], metadata={"author": "me"})
    assert (v.ref, v.kind, v.family, v.tags, v.metadata, v.aliases) == \
        ("me/style@1", "style", "sd15", ["anime"], {"author": "me"}, [])
    assert registry.get("me/style") == v
    assert registry.versions("me/style") == [v]
    assert [x.ref for x in registry.search(kind="style")] == ["me/style@1"]
    assert registry.search(kind="motion") == []
    assert registry.add(tiny.style_lora_kohya, name="me/style") == v  # exist_ok: the same tensors, the same version
    with pytest.raises(DuplicateVersionError, match="already holds these tensors") as dup:
        registry.add(tiny.style_lora_kohya, name="me/style", exist_ok=False)
    assert dup.value.version == v  # the error's field crosses the wire as a VersionInfo

    tensors = load_file(str(tiny.style_lora_kohya))
    odd = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
           "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)}
    save_file({**tensors, **odd}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UnmatchedKeysError, match="strict=False") as unmatched:
        registry.add(tmp_path / "odd.safetensors", name="me/odd")
    assert sorted(unmatched.value.keys) == sorted(odd)  # and so does this one, as a list of keys
    with pytest.raises(NotFoundError, match="no artifact named me/odd"):
        registry.get("me/odd")  # nothing was stored

    assert registry.alias(v.ref, "prod").aliases == ["prod"]
    assert registry.get("me/style:prod").ref == "me/style@1"
    assert registry.tag("me/style:prod", ["best"], remove=["anime"]).tags == ["best"]
    registry.unalias("me/style:prod")
    with pytest.raises(NotFoundError, match="alias 'prod'"):
        registry.get("me/style:prod")
    assert registry.path(v.ref).read_bytes() == tiny.style_lora_kohya.read_bytes()
    lora = registry.open(v.ref)
    assert (type(lora).__name__, lora.kind) == ("LoRA", "style")


def test_lineage_and_register_output(registry, tiny, tmp_path):
    from weightlab.files import tensor_hash

    style = registry.add(tiny.style_lora_kohya, name="me/style")
    accel = registry.add(tiny.accel_lora, name="me/lcm")
    trained = Derivation(relation="trained_from", inputs=[LineageInput(ref=style.ref, role="teacher"),
                                                          LineageInput(tensor_hash="ab" * 32, label="data.tar")])
    node = registry.add_lineage(accel.ref, trained)
    assert (node.label, node.relation) == ("me/lcm@1", "trained_from")
    assert [(e.role, e.node.label) for e in node.inputs] == [("teacher", "me/style@1"), ("term", "data.tar")]
    assert registry.lineage(accel.ref, depth=0).truncated

    out = registry.register_output(tiny.motion_lora, name="me/motion", kind="motion_lora", source="job:test",
                                   derivation=Derivation(relation="trained_from", inputs=[LineageInput(ref=accel.ref)]),
                                   tags=["trained"], metadata={"steps": 3})
    assert (out.ref, out.kind, out.source, out.tags, out.metadata) == \
        ("me/motion@1", "motion_lora", "job:test", ["trained"], {"steps": 3})
    assert out.tensor_hash == tensor_hash(tiny.motion_lora)
    tree = registry.lineage(out.ref)
    assert tree.inputs[0].node.label == "me/lcm@1"
    assert [e.node.label for e in tree.inputs[0].node.inputs] == ["me/style@1", "data.tar"]


def test_lineage_records_the_components_each_term_changed(registry, tiny, style_lora_te, tmp_path):
    from weightlab.merge import merge_to_folder

    recipe = Recipe(base=str(tiny.base_dir), terms=(Term(source=str(style_lora_te), kind="style", scale=0.8),
                                                    Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0)))
    merge_to_folder(recipe, tmp_path / "out", progress=False)  # writes text_encoder/ too: the style has a lora_te half
    registry.register_output(tmp_path / "out", name="me/merged", kind="base",
                             derivation=Derivation.from_merged_file(tmp_path / "out"))
    assert [(e.role, e.components) for e in registry.lineage("me/merged").inputs] == \
        [("base", None), ("style", ["unet", "text_encoder"]), ("image_accel", ["unet"])]


def test_jobs(registry, tiny):
    registry.add(tiny.base_ldm, name="me/base")
    registry.add(tiny.style_lora_kohya, name="me/style")
    recipe = Recipe(base="me/base@1", terms=(Term(source="me/style@1", kind="style", scale=0.5),))
    job = registry.submit_job("merge", {"recipe": recipe.model_dump(mode="json"), "output": "me/merged"})
    assert (job.kind, job.namespace, job.status in ("queued", "running")) == ("merge", "me", True)
    done = registry.wait_job(job.id, timeout=120, poll=0.05)
    assert (done.status, done.result_ref, done.error) == ("succeeded", "me/merged@1", None)
    assert registry.job(job.id) == done
    assert [j.id for j in registry.jobs(status="succeeded")] == [job.id]
    assert registry.jobs(status="failed") == []
    assert registry.get("me/merged@1").source == f"job:{job.id}"
    assert registry.lineage("me/merged@1").relation == "merged_from"
    with pytest.raises(JobSpecError, match="unknown job kind 'nope'"):
        registry.submit_job("nope", {})
    with pytest.raises(NotFoundError, match="no job with id 999"):
        registry.job(999)


def test_tokens_namespaces_and_maintenance(registry, tiny):
    before = {t.id for t in registry.tokens()}
    created = registry.create_token(namespace="team", scope="write", name="ci", expires_in_days=1)
    assert (created.namespace, created.scope, created.name, created.token[:3]) == ("team", "write", "ci", "wl_")
    assert created.expires_at is not None and created.expires_at.tzinfo is not None
    listed = {t.id: t for t in registry.tokens()}
    assert set(listed) - before == {created.id}
    assert listed[created.id].model_dump() == created.model_dump(exclude={"token"})  # never the secret
    registry.revoke_token(created.id)
    assert {t.id for t in registry.tokens()} == before
    with pytest.raises(NotFoundError, match=f"no token with id {created.id}"):
        registry.revoke_token(created.id)

    registry.add(tiny.style_lora_kohya, name="team/style")
    assert NamespacePublic(name="team", public=False) in registry.namespaces()
    assert registry.set_public("team") == NamespacePublic(name="team", public=True)
    assert NamespacePublic(name="team", public=True) in registry.namespaces()

    report = registry.verify()
    assert (report.ok, report.checked) == (True, 1)
    assert registry.gc(dry_run=True).deleted == []


# The methods each side has besides the contract: the local database's repair, and a client's single-file download.
EXTRA = {Registry: {"repair"}, Client: {"download"}}
INHERITED = {"wait_job"}  # implemented once, in the Protocol


def _public_methods(cls) -> set[str]:
    return {name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def _shape(sig: inspect.Signature, *, drop: str | None = None):
    return ([(p.name, p.kind, p.default, str(p.annotation)) for p in sig.parameters.values() if p.name != drop],
            str(sig.return_annotation))


def test_registry_and_client_have_the_protocol_signatures():
    protocol = {name for name in _public_methods(RegistryProtocol)}
    assert {"add", "lineage", "submit_job", "create_token", "namespaces"} <= protocol
    for cls in (Registry, Client):
        assert RegistryProtocol in cls.__mro__  # explicit: the Protocol also lends them wait_job
        assert _public_methods(cls) - protocol == EXTRA[cls], cls.__name__
        for name in protocol:
            if name not in INHERITED:
                assert name in vars(cls), f"{cls.__name__} does not implement {name}"
            want = _shape(inspect.signature(getattr(RegistryProtocol, name)))
            # the local registry's read methods take the namespaces a web API caller may read, as a last keyword
            got = _shape(inspect.signature(getattr(cls, name)), drop="namespaces" if cls is Registry else None)
            assert got == want, f"{cls.__name__}.{name}"
    assert [p.kind for n in ("search", "lineage", "tokens") for p in inspect.signature(getattr(Registry, n)).parameters
            .values() if p.name == "namespaces"] == [inspect.Parameter.KEYWORD_ONLY] * 3
