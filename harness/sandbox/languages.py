"""The languages the sandbox can judge, their names, and where to get their toolchains."""

from __future__ import annotations

from typing import Optional

LANGUAGES = ("python", "cpp", "java", "js", "go")
ALIASES = {"py": "python", "c++": "cpp", "javascript": "js", "golang": "go"}
# the file a program's text goes to (build_program) and the toolchain starts from (run_program)
MAIN_FILE = {"python": "main.py", "cpp": "main.cpp", "java": "Main.java", "js": "main.js", "go": "main_test.go"}
INSTALL_HINT = {
    "python": "install python3",
    "cpp": "apt-get install g++",
    "java": "apt-get install openjdk-17-jdk-headless",
    "js": "apt-get install nodejs",
    "go": "apt-get install golang-go golang-github-stretchr-testify-dev",
}


def normalise_language(language: Optional[str]) -> str:
    """``"C++"`` -> ``"cpp"``, ``"JavaScript"`` -> ``"js"``; unknown names come back lower-cased."""
    name = str(language or "").strip().lower()
    return ALIASES.get(name, name)
