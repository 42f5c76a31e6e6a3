"""Fixtures for the end-to-end scenarios: one node per run (a kubelet and containerd in a private
namespace), the plugin in each run mode as a session fixture (tests are grouped by mode, so each
mode starts the plugin once), and `h`, a harness that puts the plugin back in its default state
before each scenario and deletes the scenario's pods after it.

The run ends with NOTE and MEASURE lines and, as its last line, "N passed, M failed" (errors in
setup count as failures), which .ci/run adds up over the kubelets it tests."""

from __future__ import annotations

import os

import pytest

from framework.cluster import Binaries, Cluster
from framework.harness import Harness
from framework.node import Node, SetupError, Settings
from framework.plugin import make

DEFAULT_MODES = ["kubelet-socket", "plugin-watcher"]

_outcomes: dict[str, str] = {}  # test id -> "passed" or "failed"
_measures: list[str] = []
_notes: list[str] = []


def modes() -> list[str]:
    env = os.environ.get("KDP_E2E_REGISTRATION", "").split()
    if env:
        return env
    return DEFAULT_MODES + (["pod"] if os.environ.get("PLUGIN_IMAGE") else [])


def pytest_generate_tests(metafunc):
    if "plugin" in metafunc.fixturenames:
        wanted = modes()
        marker = metafunc.definition.get_closest_marker("modes")
        if marker:
            wanted = [m for m in wanted if m in marker.args]
        metafunc.parametrize("plugin", wanted, indirect=True, scope="session")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def node(settings):
    n = Node(settings)
    try:
        n.up()
        yield n
    finally:
        n.failed = n.failed or _count("failed") > 0
        n.down()


@pytest.fixture(scope="session")
def cluster(settings):
    """A node with a control plane of the kubelet's release (integration/cluster)."""
    if not (settings.control_plane and settings.etcd):
        raise SetupError("the cluster scenarios need KDP_E2E_CONTROL_PLANE and KDP_E2E_ETCD "
                         "(run them as `e2e.sh --cluster`)")
    c = Cluster(Node(settings), Binaries.from_dir(settings.control_plane, settings.etcd),
                settings.kubectl)
    try:
        c.up()
        yield c
    finally:
        c.node.failed = c.node.failed or _count("failed") > 0
        c.down()


@pytest.fixture(scope="session")
def measures() -> list[str]:
    """MEASURE lines, printed at the end of the run."""
    return _measures


@pytest.fixture(scope="session")
def plugin(request, node):
    """The plugin in one run mode, started and registered; stopped when its mode's tests end."""
    p = make(node, request.param)
    p.start()
    try:
        p.wait_registered(1)
        if p.mode == "pod":
            p.wait_ready()
            _measures.append(f"[kubelet 1.{node.settings.kubelet_minor}, pod] plugin memory, started, idle: {p.memory()}")
            assert "registering through the kubelet's plugin watcher" in p.log_text(), \
                "the DaemonSet's registration \"auto\" did not pick the plugin watcher"
    except AssertionError as e:
        raise SetupError(f"the plugin ({p.mode}) did not come up: {e}\n{p.tail()}") from None
    yield p
    p.stop()
    node.wait_watcher_let_go()


@pytest.fixture
def h(request, node, plugin):
    """The harness for one scenario: the plugin as every scenario expects to find it (running
    with its default options, registered), and no pod of an earlier scenario left."""
    for marker, ok in (("min_kubelet", lambda m: node.settings.kubelet_minor >= m.args[0]),
                       ("containerd2", lambda m: node.containerd_major >= 2)):
        m = request.node.get_closest_marker(marker)
        if m and not ok(m):
            pytest.skip(f"needs {marker} {m.args or ''}: kubelet 1.{node.settings.kubelet_minor}, "
                        f"containerd {node.containerd_major}")
    if not plugin.default():
        plugin.restart()
        plugin.wait_registered(1)
    if plugin.mode == "pod":
        plugin.wait_ready()
    harness = Harness(node, plugin, _measures, _notes)
    yield harness
    harness.delete_all_pods()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A scenario passed when its body did and neither its setup nor its teardown failed."""
    rep = yield
    if rep.failed:
        _outcomes[item.nodeid] = "failed"
    elif rep.when == "call" and rep.passed:
        _outcomes.setdefault(item.nodeid, "passed")
    return rep


def _count(outcome: str) -> int:
    return sum(1 for o in _outcomes.values() if o == outcome)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.write_line("")
    for n in _notes:
        tr.write_line(f"NOTE  {n}")
    for m in _measures:
        tr.write_line(f"MEASURE  {m}")


def pytest_unconfigure(config):
    # After pytest's own summary, so that .ci/run finds it as the last line.
    print(f"{_count('passed')} passed, {_count('failed')} failed", flush=True)
