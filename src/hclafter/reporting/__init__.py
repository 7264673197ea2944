"""What we print from run directories: tables (evidence.py, format.py), figures (plots.py) and
self-contained HTML pages (html.py, report.py)."""
