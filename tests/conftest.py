"""Shared pytest set-up: a derandomised hypothesis profile so CI runs are reproducible."""

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "multiprocess: spawns torch.distributed worker processes (CPU, gloo)"
    )
