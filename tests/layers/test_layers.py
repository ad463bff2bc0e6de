"""The house's rules that import-linter does not check (DESIGN.md "Layers"; issue 10 item 1):
no `_private` name is imported across packages, and the layers contract itself holds."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sendense", "tools", "connectors", "labs", "activities", "workflows", "workers", "app", "bench")


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parent.parts)


def private_imports_across_packages() -> list[str]:
    """`from a.b import _x` (or `import a.b._x`) where a.b is not the importing module's own package."""
    found = []
    for path in _modules():
        here = _package_of(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] not in PACKAGES:
                    continue
                target_pkg = (
                    node.module
                    if (ROOT / node.module.replace(".", "/")).is_dir()
                    else (node.module.rpartition(".")[0])
                )
                for alias in node.names:
                    private = alias.name.startswith("_") or any(
                        part.startswith("_") and not part.startswith("__") for part in node.module.split(".")
                    )
                    if private and target_pkg != here:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_no_private_name_is_imported_across_packages() -> None:
    assert private_imports_across_packages() == []


def test_the_checker_sees_a_private_import(tmp_path: Path) -> None:
    """The check above must be able to fail: a planted cross-package private import is found."""
    planted = ROOT / "labs" / "_planted_for_test.py"
    planted.write_text("from tools.qemu import _sweep_stale_servers  # noqa: F401\n")
    try:
        assert any(
            "_planted_for_test.py:1: tools.qemu._sweep_stale_servers" in f
            for f in private_imports_across_packages()
        )
    finally:
        planted.unlink()


def test_layers_contract_holds() -> None:
    """import-linter over pyproject.toml's contracts (scripts/test.sh runs it too)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    p = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]


# the memory platform by its name as a platform ("memory" alone is an ordinary word of the data path)
PLATFORM_WORDS = re.compile(
    r"kvm|aws|qcow2|ebs|qmp|libvirt|boto|connectors\.memory|[\"']memory[\"']|in-memory|\(memory\)", re.I
)


def platform_mentions() -> list[str]:
    """Lines of activities/, workflows/ and the core that name a platform, but for the registry's table
    (issue 10 item 2: a platform lives in its own package and one registry line)."""
    found = []
    for pkg in ("activities", "workflows", "sendense"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                registry_line = path.name == "platforms.py" and re.match(
                    r'\s*"\w+": "connectors\.\w+\.plugin",', line
                )
                if PLATFORM_WORDS.search(line) and not registry_line:
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


def test_no_platform_is_named_outside_its_package_but_in_the_registry() -> None:
    assert platform_mentions() == []


def test_the_platform_check_sees_every_platform_named_in_the_core() -> None:
    """It must be able to fail, for the memory platform too (whose name is also an ordinary word)."""
    planted = ROOT / "sendense" / "_planted_platform_for_test.py"
    planted.write_text(
        'A = "memory"  # the memory platform by name\n'
        "from connectors.memory import store  # noqa: F401\n"
        "B = 'ebs'\n"
        "C = memoryview(b'')  # an ordinary word: not a platform\n"
    )
    try:
        found = [f for f in platform_mentions() if "_planted_platform_for_test.py" in f]
        assert [f.split(":")[1] for f in found] == ["1", "2", "3"]
    finally:
        planted.unlink()
