"""One module per benchmark family, each with its loader (and, where the family has one, its prompt and scorer).

Each benchmark becomes one or more eval sets: harmful sets measure attack success (ASR), benign sets measure
over-refusal.

| benchmark | path | sets (``<benchmark>_<mode>``) |
| --- | --- | --- |
| ``figstep`` | SafeBench ``safebench.csv`` (or ``SafeBench-Tiny.csv``) | ``image`` (FigStep attack), ``text`` |
| ``mmsafetybench`` | ``data/`` (``processed_questions/``, ``imgs/``) | ``sd_typo``, ``typo``, ``sd``, ``text`` |
| ``vlguard`` | VLGuard ``test.json`` | ``safe_safe`` (benign), ``safe_unsafe``, ``unsafe`` |
| ``advbench`` | AdvBench ``harmful_behaviors.csv`` | ``text``, ``image`` (FigStep-rendered) |
| ``harmbench`` | a HarmBench behaviour CSV | ``text``, ``image`` (FigStep-rendered) |
| ``xstest`` | XSTest ``xstest_prompts.csv`` (or ``xstest_v2_prompts.csv``) | ``safe`` (benign), ``unsafe`` |
| ``demo`` | none (bundled) or a file of the demo layout | ``typographic``, ``text``, ``benign`` |
| ``world`` | none (bundled) | ``text``, ``typographic``, ``benign_text``, ``benign_typographic``, ... |
"""

from mllm_safety.evaluation.sets import Task
from mllm_safety.evaluation.tasks import advbench, demo, figstep, harmbench, mmsafetybench, vlguard, world, xstest

TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK
    for module in (demo, world, figstep, mmsafetybench, vlguard, advbench, harmbench, xstest)
}
"""Benchmark name -> its task."""
