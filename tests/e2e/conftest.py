"""The demo's model and data, built once per test session for every end-to-end module."""
import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from megatron_fipo.data.demo_task import build_demo

    out = str(tmp_path_factory.mktemp("demo") / "demo")
    build_demo(out)
    return out
