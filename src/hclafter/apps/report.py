"""``hclafter report``: the HTML report of a finished run, or of a sweep with its tables and figures."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..engine import runfiles
from ..reporting.report import write_report
from .sweep import is_sweep, read_sweep_file, write_results


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.run_dir)
    if is_sweep(folder):  # a sweep: its tables, figures and report, from the finished runs
        sweep = read_sweep_file(folder)
        write_results(sweep, folder)
        done = sum(runfiles.is_finished(r.out) for r in sweep.runs)
        print(f"sweep report written to {folder / 'report.html'} ({done} of {len(sweep.runs)} runs finished)")
        return 0
    print(f"report written to {write_report(folder)}")
    return 0
