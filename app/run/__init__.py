"""Running the federation: the configuration (``config``), a run's output directory (``outputs``) and
checkpoints (``checkpoint``), the ServerApp's wiring of strategy and results (``server``), the launcher
(``launch``, on the Flower process helpers of ``superlink``), sweeps (``sweep``), the multitask baseline
(``multitask``) and the pool inspector (``pool``)."""
