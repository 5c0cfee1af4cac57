"""Shared test fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def qos_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point QOS_COMPILE_HOME at an empty per-test folder, so no test reads or writes the real user data."""
    home = tmp_path_factory.mktemp("qos_home")
    monkeypatch.setenv("QOS_COMPILE_HOME", str(home))
    return home


# --- parallel runs (pytest-xdist, ``scripts/test.sh`` runs ``-n N --dist loadgroup``) --------------
#: Files whose tests share another file's module-level artefacts run in that file's group.
_SHARED_GROUP = {"test_qos_run": "test_compile"}
#: Files whose tests are parametrized by ``name`` (a network built once per process): one group each.
_PER_NETWORK = {"test_user_architectures"}
#: Groups sent to the workers first (the longest ones), so that no long file starts last.
_LONG_FIRST = ("test_user_architectures", "test_lut_dot", "test_compile", "test_bench_cli", "test_fuzz_manifest",
               "test_distributed", "test_wheel", "test_lut_factors")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One xdist group per test file (each file builds its models once, in one worker), the
    longest files first; a run without xdist only sees the order change between files."""
    def group(item: pytest.Item) -> str:
        mod = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else item.nodeid
        name = getattr(getattr(item, "callspec", None), "params", {}).get("name")
        if mod in _PER_NETWORK and isinstance(name, str):
            return f"{mod}[{name}]"          # the file builds each network once: one group per network
        return _SHARED_GROUP.get(mod, mod)

    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    rank_of = lambda g: rank.get(g.split("[", 1)[0], len(rank))  # noqa: E731
    order = {id(item): i for i, item in enumerate(items)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda it: (rank_of(group(it)), order[id(it)]))
