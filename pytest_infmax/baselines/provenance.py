"""Where a saved run's code came from: its git commit and branch, and when it was saved.

A history is only useful for finding the change that made things slower if each run
says which commit it measured (``infmax history`` prints the commit at each change
point). CI systems say so in their environment, which is read first (a CI checkout is
often a detached HEAD or a merge commit); elsewhere ``git`` is asked, with a timeout,
never through a shell. Nothing here fails a run: what cannot be known is None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: seconds one ``git`` call may take
GIT_TIMEOUT_S = 5.0

#: (commit variable, branch variables in order) per CI system; GitHub's pull requests
#: name their head branch in GITHUB_HEAD_REF (GITHUB_REF_NAME is then ``123/merge``)
_CI_VARIABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GITHUB_SHA", ("GITHUB_HEAD_REF", "GITHUB_REF_NAME")),
    ("CI_COMMIT_SHA", ("CI_COMMIT_BRANCH", "CI_COMMIT_REF_NAME")),  # GitLab
    ("BUILDKITE_COMMIT", ("BUILDKITE_BRANCH",)),
)


def _git(args: list[str], cwd: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run(
            [git, *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def git_info(cwd: str | os.PathLike[str] = ".", env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"commit", "branch", "source"}``: from a CI system's variables where set, else from
    ``git`` in ``cwd`` (the nearest existing folder); each None where unknown."""
    env = os.environ if env is None else env
    for commit_var, branch_vars in _CI_VARIABLES:
        commit = env.get(commit_var, "").strip()
        if commit:
            branch = next((env[v].strip() for v in branch_vars if env.get(v, "").strip()), None)
            return {"commit": commit, "branch": branch, "source": commit_var}
    where = Path(cwd).resolve()
    while not where.is_dir() and where != where.parent:
        where = where.parent
    head = _git(["rev-parse", "HEAD"], where)
    if head is None:
        return {"commit": None, "branch": None, "source": None}
    name = _git(["rev-parse", "--abbrev-ref", "HEAD"], where)
    return {"commit": head, "branch": None if name == "HEAD" else name, "source": "git"}


def run_provenance(cwd: str | os.PathLike[str] = ".", env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a saved run records about its origin: ``git`` (commit, branch, where from) and
    ``saved_at`` (UTC, ISO 8601)."""
    return {"git": git_info(cwd, env), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
