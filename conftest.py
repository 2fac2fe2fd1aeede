"""pytest setup: hypothesis profiles and the `slow` marker.

The default profile is quick (a few examples per property) so that `pytest` stays within a few
minutes on two CPU cores. GMF_HYPOTHESIS=thorough draws many more examples. Hypothesis loads a
built-in profile named "ci" when CI=true; ours is always loaded explicitly, so CI runs exactly
what a developer runs. Tests marked `slow` (minutes each) run only with GMF_SLOW=1.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "quick", max_examples=10, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("GMF_HYPOTHESIS", "quick"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; runs only with GMF_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GMF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set GMF_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
