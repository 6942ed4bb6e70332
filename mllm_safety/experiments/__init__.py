"""The paper's grid of experiments in one command (``python -m mllm_safety.experiments``, :mod:`.runner`): named
experiments (``grid``), launched in turn, as a SLURM array or a W&B sweep (``launchers``), compared in one table
(``comparison``)."""
