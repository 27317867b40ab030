"""Every entry module imports on its own, in a fresh interpreter.

One pytest process imports modules in whatever order the tests happen to: a cycle between
packages that only breaks when a module is imported first (the way `flwr run` loads the
ServerApp, a SuperNode the ClientApp, or a user the CLI) stays hidden there.  Each module here
is imported alone in its own new Python process (all started at once: most of the time is
importing torch and Flower).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("federation.server_app", "clients.client_app", "minusfed.cli", "minusfed.demo",
                 "minusfed.privacy_cli", "simulation.inprocess", "task.config")


def import_alone(modules: tuple[str, ...]) -> dict[str, str]:
    """module -> stderr tail for each module whose `python -c "import X"` failed."""
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for m in modules}
    failed = {}
    for module, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed[module] = err[-2000:]
    return failed


def test_each_entry_module_imports_alone_in_a_fresh_interpreter() -> None:
    failed = import_alone(ENTRY_MODULES)
    assert not failed, "\n\n".join(f"`python -c 'import {m}'` failed:\n{err}"
                                   for m, err in failed.items())


def test_a_module_that_fails_to_import_is_reported() -> None:
    assert set(import_alone(("task.config", "task.no_such_module"))) == {"task.no_such_module"}
