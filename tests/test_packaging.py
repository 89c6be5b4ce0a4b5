"""The package as pyproject.toml declares it: every folder and data file of the repository that
the installed ``jobcast`` needs is in the wheel's list. (.ci/wheel_smoke.py builds and runs the
wheel itself; this catches a forgotten entry in a second, with a message saying which.)"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import jobcast
from jobcast.cli import commands, main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Every importable package under the mapped folders: ``jobcast.routes`` -> server/routes."""
    found = {}
    for top, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / folder)
            name = ".".join([top, *relative.parts])
            found[name] = init.parent
    return found


def test_every_package_folder_is_listed_and_maps_to_its_folder() -> None:
    folders = package_folders()
    assert sorted(folders) == sorted(SETUPTOOLS["packages"]), "list each package folder in [tool.setuptools] packages"
    for name, folder in folders.items():
        mapped = [top for top in SETUPTOOLS["package-dir"] if name == top or name.startswith(top + ".")]
        assert mapped, f"{name} ({folder}) is under no package-dir mapping"


def test_every_data_file_of_a_package_is_shipped() -> None:
    patterns: dict[str, list[str]] = SETUPTOOLS["package-data"]
    folders = package_folders()
    for top in SETUPTOOLS["package-dir"].values():
        for path in (ROOT / top).rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            owner = max((name for name, folder in folders.items() if folder in path.parents), key=len)
            relative = path.relative_to(folders[owner]).as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in patterns.get(owner, [])), (
                f"{path.relative_to(ROOT)} would be left out of the wheel: add a pattern for it to "
                f"[tool.setuptools.package-data] {owner!r}"
            )


def test_the_public_api_for_job_modules() -> None:
    from jobcast.worker.context import JobContext
    from jobcast.worker.errors import PermanentError, RetryableError
    from jobcast.worker.types import job_type

    assert jobcast.job_type is job_type and jobcast.JobContext is JobContext
    assert jobcast.RetryableError is RetryableError and jobcast.PermanentError is PermanentError
    assert {"job_type", "JobContext", "RetryableError", "PermanentError", "Priority"} <= set(jobcast.__all__)


def test_importing_jobcast_imports_the_job_domain_only_when_a_public_name_is_used() -> None:
    """Every ``jobcast`` command imports the package first: it must not pay for the store."""
    probe = (
        "import sys, jobcast; before = 'jobcast.worker.store' in sys.modules; jobcast.job_type; "
        "print(before, 'jobcast.worker.types' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = jobcast.nothing  # type: ignore[attr-defined]
    assert set(jobcast.__all__) <= set(dir(jobcast))


def test_version_is_the_same_everywhere() -> None:
    out = subprocess.run([sys.executable, "-m", "jobcast", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"jobcast {jobcast.__version__}"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jobcast.__version__"}


def test_the_client_command_names_a_server_install_knows_are_the_real_ones() -> None:
    """A server install (no ``cli`` extra) names the client commands to say what to install."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    commands.add_client_commands(sub)
    assert set(sub.choices) == set(main.CLIENT_COMMAND_NAMES)


def test_the_dashboard_spells_the_domain_vocabulary_as_the_domain_does() -> None:
    """The browser cannot import models.py; its copies of the status and event sets are checked here."""
    from jobcast.worker.models import TERMINAL, EventName

    static = ROOT / "static" / "js"
    terminal = re.search(r"export const TERMINAL = new Set\(\[(.*?)\]\)", (static / "format.js").read_text())
    assert terminal is not None
    assert set(re.findall(r'"([a-z.]+)"', terminal.group(1))) == {status.value for status in TERMINAL}
    feed = (static / "feed.js").read_text()
    assert set(re.findall(r'"(job\.[a-z]+)"', feed)) == {event.value for event in EventName}
