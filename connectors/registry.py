"""One table from platform name to connector factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sendense.errors import InvalidSpec
from sendense.models import JobSpec
from sendense.protocols import SourceConnector, TargetConnector

SourceFactory = Callable[[str, Any, Path], SourceConnector]
TargetFactory = Callable[[str, Any, str], TargetConnector]  # job name, target spec, job id


def _kvm_source(job: str, spec: Any, work_dir: Path) -> SourceConnector:
    from connectors.kvm.source import make_kvm_source

    return make_kvm_source(job, spec, work_dir)


def _kvm_target(job: str, spec: Any, job_id: str) -> TargetConnector:
    from connectors.kvm.target import KvmTarget

    return KvmTarget(job, spec.path, job_id=job_id)


def _aws_source(job: str, spec: Any, work_dir: Path) -> SourceConnector:
    from connectors.aws.source import AwsSourceConnector

    return AwsSourceConnector(job, spec, work_dir)


def _aws_target(job: str, spec: Any, job_id: str) -> TargetConnector:
    from connectors.aws.target import AwsTargetConnector

    return AwsTargetConnector(job, spec, job_id=job_id)


SOURCES: dict[str, SourceFactory] = {"kvm": _kvm_source, "aws": _aws_source}
TARGETS: dict[str, TargetFactory] = {"kvm": _kvm_target, "aws": _aws_target}


def source_for(spec: JobSpec, work_dir: Path) -> SourceConnector:
    try:
        factory = SOURCES[spec.source.platform]
    except KeyError:
        raise InvalidSpec(f"source.platform: {spec.source.platform!r} is not supported") from None
    return factory(spec.name, spec.source, work_dir)


def target_for(spec: JobSpec) -> TargetConnector:
    try:
        factory = TARGETS[spec.target.platform]
    except KeyError:
        raise InvalidSpec(f"target.platform: {spec.target.platform!r} is not supported") from None
    return factory(spec.name, spec.target, spec.job_id)
