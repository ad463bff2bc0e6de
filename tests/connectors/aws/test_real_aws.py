"""Whether the AWS contract tests also ran against real AWS (see conftest.py for how to turn it on)."""

from __future__ import annotations

import pytest
from conftest import REAL  # type: ignore[attr-defined]


def test_real_aws_contract_is_configured() -> None:
    if not REAL:
        pytest.skip(
            "real AWS contract off: set SENDENSE_AWS_TEST_INSTANCE (an instance with EBS volumes), "
            "SENDENSE_AWS_TEST_REGION and AWS credentials to run tests/connectors/aws against it too"
        )
