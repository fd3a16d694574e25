"""`python -m gti.benchmark [config.yaml] [key=value ...]` — GTI against every init baseline, over seeds.

Each cell (method x seed) runs stage 1 (when the method grounds) and stage 2 through the same `gti.ground` /
`gti.finetune` main(), from a YAML written into the cell folder: inside this process (in_process=true, the
default) or as `python -m gti.<stage> CELL/<stage>.yaml` processes (in_process=false, and always when cells
run side by side). Finished cells are skipped, so an interrupted benchmark resumes by running the command again.
Cells run one after another unless `parallel` > 1; each stage gets `threads` CPU threads.
The report folder gets results.md, results.json and plots (spectra, cosine maps, metric bars).
"""

from __future__ import annotations

import sys

from gti.experiments.benchmark import BenchmarkConfig, run


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, BenchmarkConfig, run)


if __name__ == "__main__":
    main(sys.argv[1:])
