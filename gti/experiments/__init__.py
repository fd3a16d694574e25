"""Experiments: stage commands run the way a user would type them (or their main() inside this process).

arms.py       the initialisations compared (one table for the benchmark and the protocol presets)
runner.py     one stage as `python -m gti.<stage>` or in-process, skipped when its run folder is finished (resume)
benchmark.py  every arm over seeds, cells one at a time or side by side
report.py     the benchmark's results.md / results.json / plots from its finished cells
report_sections.py  results.md's sections: users covered, reference rows, paired differences and their reading
stats.py      paired bootstrap intervals of one ranker minus another over the same test users
protocol.py   one published setting as the four stage commands, checked before anything runs
"""
