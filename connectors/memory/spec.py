"""The memory platform's part of a job spec: a VM in a memory store (source), and a job's replicas and
points in a memory store (target). A store is named (process memory) or a directory (plain files)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from sendense.models import PlatformSpec, SourceSpec, TargetSpec, resolve_path

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MEMORY_CREDENTIALS = "the memory platform needs none"


def _power_of_two(v: int, what: str) -> int:
    if v & (v - 1):
        raise ValueError(f"{what} must be a power of two (e.g. 4096, 65536)")
    return v


class _MemoryPlace(PlatformSpec):
    """Which memory store: a name (process memory) or a directory (plain files), not both."""

    store: str | None = Field(
        default=None, pattern=_NAME, description="store in process memory (default: 'default')"
    )
    directory: Path | None = Field(default=None, description="a store of plain files in this directory")

    credentials_hint = MEMORY_CREDENTIALS

    @model_validator(mode="after")
    def _one_place(self) -> Self:
        if self.store is not None and self.directory is not None:
            raise ValueError("give store or directory, not both")
        return self

    @property
    def where(self) -> str:
        return str(self.directory) if self.directory is not None else (self.store or "default")

    def resolved(self, base: Path) -> Self:
        if self.directory is None:
            return self
        return self.model_copy(update={"directory": resolve_path(self.directory, base)})


class MemorySource(_MemoryPlace, SourceSpec):
    """A VM in a memory store (a test or a developer made it there)."""

    platform: Literal["memory"]
    vm: str = Field(pattern=_NAME, description="the VM's name in the store")
    block_size: int = Field(
        default=64 << 10, ge=512, le=64 << 20, description="granularity of change tracking, bytes"
    )
    change_tracking: bool = Field(
        default=True, description="false: every sync after the first is a digest-compare resync"
    )

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        return _power_of_two(v, "block_size")

    def describe(self) -> str:
        return f"memory:{self.where}:{self.vm}"


class MemoryTarget(_MemoryPlace, TargetSpec):
    """Replicas and points in a memory store."""

    platform: Literal["memory"]
    block_size: int = Field(
        default=1,
        ge=1,
        le=64 << 20,
        description="1: writes of any byte range; else only whole blocks of this size (a snapshot API's)",
    )

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        return v if v == 1 else _power_of_two(v, "block_size")

    def describe(self) -> str:
        return f"memory:{self.where}"
