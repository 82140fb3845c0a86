"""Distributed tests: spawned gloo jobs at world size 2 (marker ``multiprocess``)."""


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "multiprocess: spawns torch.distributed worker processes (CPU, gloo)"
    )
