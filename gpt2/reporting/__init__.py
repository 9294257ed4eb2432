"""The speed-up report, built from run files alone (never the loop): build.py reads the runs and writes
report.md, report.csv and report.png (for `python -m gpt2.report` and the sweep's end); the parts: each
summary.json read and checked, the columns, the cells, the rules, the chart."""
