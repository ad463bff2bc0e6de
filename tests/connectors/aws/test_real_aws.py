"""Whether the AWS contract tests also ran against real AWS (see conftest.py for how to turn it on)."""

from __future__ import annotations

import os

import pytest

REAL = os.environ.get("SENDENSE_AWS_TEST_INSTANCE")  # as conftest.py reads it (importing "conftest" by
# name picks whichever conftest.py was loaded last: tests/scenarios has one too)


def test_real_aws_contract_is_configured() -> None:
    if not REAL:
        pytest.skip(
            "real AWS contract off: set SENDENSE_AWS_TEST_INSTANCE (an instance with EBS volumes), "
            "SENDENSE_AWS_TEST_REGION and AWS credentials to run tests/connectors/aws against it too"
        )
