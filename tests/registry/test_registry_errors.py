"""Errors on the wire: every WeightlabError crosses the web API as an ErrorBody and comes back as the same class
with the same message and fields (the server's status for it is its class's ``http_status``)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from weightlab import errors
from weightlab.registry.schemas import ErrorBody, FileInfo, VersionInfo, error_classes

VERSION = VersionInfo(ref="me/style@1", namespace="me", name="style", number=1, sha256="a" * 64, tensor_hash="b" * 64,
                      size_bytes=10, format="safetensors", family="sd15", kind="style", representation="lora",
                      files=[FileInfo(path="s.safetensors", sha256="a" * 64, size_bytes=10)], aliases=["prod"],
                      created_at=datetime(2026, 1, 2, tzinfo=timezone.utc))
FIELDS = {"keys": ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"], "version": VERSION}


def test_every_error_class_is_in_weightlab_errors():
    assert {cls.__module__ for cls in error_classes().values()} == {"weightlab.errors"}


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_errors_round_trip_with_their_fields(name):
    cls = error_classes()[name]
    error = cls("what went wrong. Fix: this.", *(FIELDS[f] for f in cls.field_names))
    body = ErrorBody.model_validate_json(ErrorBody.of(error).model_dump_json())
    again = body.exception()
    assert type(again) is cls and str(again) == str(error)
    for field in cls.field_names:
        assert getattr(again, field) == FIELDS[field], field


def test_statuses():
    # the table the server used to keep by hand, now read from the classes (subclasses inherit theirs)
    expected = {"AuthenticationError": 401, "PermissionDeniedError": 403, "NotFoundError": 404,
                "DuplicateVersionError": 409, "UploadTooLargeError": 413, "UnsafeFileError": 415,
                "UnsupportedMediaTypeError": 415, "HashMismatchError": 400, "FileFormatError": 422,
                "AdapterOptionError": 422, "UnmatchedKeysError": 422, "FamilyMismatchError": 422,
                "ShapeMismatchError": 422, "NonFiniteError": 422, "RecipeError": 422, "JobSpecError": 422,
                "MetadataError": 422, "RegistryError": 400, "FolderUploadError": 400, "WeightlabError": 400}
    assert {name: getattr(errors, name).http_status for name in expected} == expected


def test_an_unknown_error_comes_back_as_a_registry_error():
    again = ErrorBody(detail="from a newer server", error="SomeNewError", fields={"x": 1}).exception()
    assert type(again) is errors.RegistryError and str(again) == "from a newer server"
