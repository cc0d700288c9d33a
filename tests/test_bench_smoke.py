"""The benchmark harness's pure parts: ratios, goals and the Markdown report, and `--help`;
and that bench/ stands on relay alone, without the test suite.

No benchmark runs here (no timed assertions in the suite); `bench/run --quick` is run by hand.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
# The checkout's own top-level packages (bench, relay, tests); anything else is third-party.
FIRST_PARTY = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
BENCH_SOURCES = sorted([*(ROOT / "bench").rglob("*.py"), ROOT / "bench" / "run"])
SANDBOX_SOURCES = sorted((ROOT / "relay" / "sandbox").glob("*.py"))
SANDBOX_MAY_IMPORT = (
    "relay.config",
    "relay.settings",
    "relay.errors",
    "relay.logs",
    "relay.sandbox",
)


def _results() -> dict[str, object]:
    def runs(rps: float) -> dict[str, object]:
        return {
            "runs": [
                {
                    "clients": c,
                    "rps": rps * c,
                    "p50_ms": 1.0,
                    "p99_ms": 2.0,
                    "statuses": {"303": 10},
                    "errors": {},
                }
                for c in (1, 8, 32)
            ]
        }

    return {
        "meta": {"quick": True, "n": 300, "cpus": 2},
        "accept": {
            "bare": runs(100.0),
            "essential_sqlite": runs(150.0),
            "sqlite": runs(60.0),
            "essential_postgres": runs(100.0),
            "postgres": runs(40.0),
        },
        "e2e": {
            "relay": {"messages": 300, "seconds": 1.0, "messages_per_second": 300.0},
            "postfix_opendkim": {"messages": 300, "seconds": 3.0, "messages_per_second": 100.0},
            "postfix": {"error": "postfix is missing"},
        },
        "sign": {
            "openssl_rsa2048_raw": {"us_per_message": 200.0, "per_second": 5000},
            "ours_rsa2048": {"us_per_message": 400.0, "per_second": 2500},
        },
    }


def test_ratios_divide_ours_by_the_reference() -> None:
    r = report.ratios(_results())
    assert r["accept_sqlite_32_vs_bare"] == 0.6
    assert r["accept_postgres_1_vs_bare"] == 0.4
    assert r["e2e_relay_vs_postfix_opendkim"] == 3.0
    assert r["e2e_relay_vs_postfix_unsigned"] is None
    assert r["sign_ours_rsa2048_vs_openssl"] == 2.0


def test_goals_take_the_worse_store_and_say_met_or_not() -> None:
    verdicts = {g["goal"].split()[0]: (g["actual"], g["met"]) for g in report.goals(_results())}
    # Both stores at 0.4 x their essential target; SQLite at 0.6 x bare no longer counts.
    assert verdicts["accept"] == (0.4, False)
    assert verdicts["end"] == (3.0, True)
    assert verdicts["our"] == (2.0, False)


def test_goals_not_measured_when_a_section_is_missing() -> None:
    goals = report.goals({"meta": {}})
    assert goals
    assert all(g["met"] is None for g in goals)
    assert "not measured" in report.markdown({"meta": {}})


def test_markdown_shows_every_figure_and_the_errors() -> None:
    text = report.markdown(_results())
    assert "| sqlite | 32 | 1,920 |" in text
    assert "| postfix | | | | postfix is missing |" in text
    assert "| ours_rsa2048 | 400 | 2,500 | 2 |" in text
    assert "NOT met" in text
    assert "| e2e_relay_vs_postfix_opendkim | 3 |" in text


def test_bench_run_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--quick" in out.stdout
    assert "--profile" in out.stdout


def _first_party_imports(path: Path) -> Iterator[str]:
    """Every absolute import of a first-party module in `path`, as a dotted name
    (`from relay import config` counts as relay.config)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = (
                [f"{node.module}.{alias.name}" for alias in node.names]
                if node.module in FIRST_PARTY
                else [node.module]
            )
        else:
            continue
        yield from (name for name in names if name.split(".")[0] in FIRST_PARTY)


def test_first_party_packages_are_found() -> None:
    assert {"bench", "relay", "tests"} <= FIRST_PARTY
    assert ROOT / "bench" / "main.py" in BENCH_SOURCES
    assert ROOT / "relay" / "sandbox" / "world.py" in SANDBOX_SOURCES


@pytest.mark.parametrize("path", BENCH_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_imports_only_relay_and_bench(path: Path) -> None:
    wrong = [m for m in _first_party_imports(path) if m.split(".")[0] not in {"relay", "bench"}]
    assert wrong == [], f"{path.relative_to(ROOT)} imports {wrong}: bench/ must not need tests/"


@pytest.mark.parametrize("path", SANDBOX_SOURCES, ids=lambda p: p.name)
def test_sandbox_imports_only_the_bottom_layer_and_itself(path: Path) -> None:
    wrong = [
        m
        for m in _first_party_imports(path)
        if not any(m == allowed or m.startswith(allowed + ".") for allowed in SANDBOX_MAY_IMPORT)
    ]
    assert wrong == [], f"relay/sandbox/{path.name} imports {wrong}"


def test_bench_run_help_works_without_the_tests(tmp_path: Path) -> None:
    """A copy of bench/ with no tests/ beside it: relay comes from the editable install."""
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("results"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    probe = run("-c", "import tests.conftest")
    assert probe.returncode != 0, "tests/ is importable here: the check would prove nothing"
    out = run(str(tmp_path / "bench" / "run"), "--help")
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout
