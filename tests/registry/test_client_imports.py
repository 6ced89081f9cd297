"""``weightlab.Client`` reaches no SQLAlchemy: it is imported and used in a fresh process where importing
``sqlalchemy`` raises (the blocker is checked too, on the local Registry, which does need SQLAlchemy), and no module
it can import, lazily or not, imports SQLAlchemy (the import graph of tests/test_import_graph.py)."""

from __future__ import annotations

import ast
import subprocess
import sys

BLOCK = """
import sys

class BlockSqlalchemy:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "sqlalchemy":
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockSqlalchemy())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_client_imports_without_sqlalchemy(tmp_path):
    done = _run(f"""
import weightlab
from weightlab.errors import RegistryError

client = weightlab.Client("http://127.0.0.1:9", home={str(tmp_path)!r}, progress=False, timeout=2)
try:
    client.get("me/style")
except RegistryError as e:
    assert "cannot reach the registry server" in str(e), e
assert not any(m.partition(".")[0] == "sqlalchemy" for m in sys.modules)
print("client ok")
""")
    assert done.returncode == 0 and "client ok" in done.stdout, done.stderr


def test_the_blocker_blocks():
    done = _run("import weightlab.registry.service")
    assert done.returncode != 0 and "sqlalchemy is blocked in this test" in done.stderr, done.stderr


def test_no_module_the_client_can_import_imports_sqlalchemy():
    from test_import_graph import _graph, _modules  # tests/ is on sys.path: its conftest.py lives there

    modules = _modules()
    graph = _graph(modules)
    reachable, todo = set(), ["weightlab.registry.client"]
    while todo:
        if (module := todo.pop()) not in reachable:
            reachable.add(module)
            todo += graph[module]
    assert {"weightlab.registry.schemas", "weightlab.registry.ingest", "weightlab.errors"} <= reachable

    def imports_sqlalchemy(module: str) -> bool:
        for node in ast.walk(ast.parse(modules[module].read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.partition(".")[0] == "sqlalchemy" for name in names):
                return True
        return False

    assert imports_sqlalchemy("weightlab.registry.service")  # the check itself can fail
    assert sorted(m for m in reachable if imports_sqlalchemy(m)) == []
