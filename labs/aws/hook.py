"""The AWS lab's hook for `sendense lab up/down/status` (named by the AWS platform's plug-in).

`up` starts the lab in the background under SENDENSE_HOME/labs/aws (or finds it running) and registers
its credentials for its endpoint (sendense.config.register_lab), so the agent already running here
reaches it at once; `down` stops it and forgets them.
"""

from __future__ import annotations

from typing import Any

from labs.aws.lab import AwsLab, AwsLabError
from sendense import config
from sendense.errors import SendenseError

ERRORS: tuple[type[Exception], ...] = (SendenseError, AwsLabError)


def lab_dir() -> Any:
    return config.home() / "labs" / "aws"


def attach() -> AwsLab | None:
    """The running AWS lab of this SENDENSE_HOME, or None."""
    try:
        lab = AwsLab.attach(lab_dir())
    except AwsLabError:
        return None
    return lab if lab.running else None


def describe(lab: AwsLab) -> dict[str, Any]:
    """What a job spec and an agent elsewhere need to reach the lab."""
    place = {"platform": "aws", "region": lab.region, "endpoint_url": lab.endpoint_url}
    return {
        "running": True,
        "endpoint_url": lab.endpoint_url,
        "region": lab.region,
        "env": lab.env(),
        "source": place,
        "target": place,
        "dir": str(lab_dir()),
        "note": "agents on this machine (sendense up, sendense worker) reach it as they are; an agent "
        "elsewhere needs the env; make an instance with `sendense lab instance NAME --disk-gib 8`",
    }


def up(port: int = 0) -> dict[str, Any]:
    lab = attach() or AwsLab(lab_dir(), port=port).start(detached=True)
    config.register_lab(lab.endpoint_url, lab.env())
    return describe(lab)


def down() -> bool:
    lab = attach()
    if lab is None:
        return False
    endpoint = lab.endpoint_url
    lab.stop()
    config.unregister_lab(endpoint)
    return True


def status() -> dict[str, Any]:
    lab = attach()
    return describe(lab) if lab is not None else {"running": False}
