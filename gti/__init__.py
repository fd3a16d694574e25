"""gti: Grounded Token Initialization for LM-based generative recommendation (arXiv 2604.02324)."""

import time

__version__ = "0.1.0"
STARTED = time.time()  # process_age() falls back to it where there is no /proc
