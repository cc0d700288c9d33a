"""The benchmark harness's pure parts: ratios, goals and the Markdown report, and `--help`.

No benchmark runs here (no timed assertions in the suite); `bench/run --quick` is run by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent


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
        "accept": {"bare": runs(100.0), "sqlite": runs(60.0), "postgres": runs(40.0)},
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
    assert verdicts["accept"] == (0.4, False)
    assert verdicts["end"] == (3.0, True)
    assert verdicts["our"] == (2.0, False)


def test_goals_not_measured_when_a_section_is_missing() -> None:
    goals = report.goals({"meta": {}})
    assert [g["met"] for g in goals] == [None, None, None]
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
