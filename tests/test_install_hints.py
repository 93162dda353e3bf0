"""What an error message or a doc tells a user to install must work from a clone: cepo_kernels is not on the
package index, and a hint to pip-install an extra of a package by that name would install whatever someone
registers under it. Hints name the dependency itself, or `pip install -e ".[extra]"` in a clone."""

import re
from pathlib import Path

import pytest

from cepo_kernels.integrations._versions import require_version

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_adapter_library_names_the_library_and_the_clone_command():
    with pytest.raises(ImportError) as info:
        require_version("cepo_no_such_package", "1.0", "2.0", extra="trl", allow_env="CEPO_TEST_ALLOW")
    msg = str(info.value)
    assert "cepo_kernels.integrations.trl needs cepo_no_such_package (>= 1.0, < 2.0)" in msg
    assert "`pip install 'cepo_no_such_package>=1.0,<2.0'`" in msg
    assert '`pip install -e ".[trl]"`' in msg


def test_no_file_tells_users_to_install_a_package_named_cepo_kernels():
    files = [*ROOT.glob("cepo_kernels/**/*.py"), *ROOT.glob("cepo_ref/**/*.py"), *ROOT.glob("examples/**/*"),
             *ROOT.glob("bench/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/**/*.md"),
             ROOT / "README.md", ROOT / ".ci" / "run"]
    named = re.compile(r"cepo[-_]kernels\[")  # an extra of a package of that name on the index
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if named.search(line)]
    assert not hits, hits
