"""Request and response bodies of the web API that are not registry models (those live in
:mod:`weightlab.registry.schemas`, :mod:`weightlab.registry.auth` and :mod:`weightlab.registry.jobs`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from weightlab.registry.schemas import VersionInfo


class ErrorBody(BaseModel):
    """Every error: a message that says what went wrong and how to fix it, and the error's type."""

    detail: str
    error: str = Field(description="the weightlab error class, e.g. NotFoundError")
    version: VersionInfo | None = Field(None, description="DuplicateVersionError: the version that already exists")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class AliasUpdate(BaseModel):
    ref: str = Field(description="the version to point the alias at: ns/name@N, ns/name@<hash>, ns/name:other-alias")


class TagsUpdate(BaseModel):
    add: list[str] = Field(default_factory=list, max_length=100)
    remove: list[str] = Field(default_factory=list, max_length=100)


class NamespaceBase(BaseModel):
    public: bool = Field(False, description="anyone may read it, without a token")


class NamespaceUpdate(NamespaceBase):
    pass


class NamespacePublic(NamespaceBase):
    name: str
