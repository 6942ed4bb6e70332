"""One module per benchmark family, each with its loader (and, where the family has one, its prompt and scorer).

Each benchmark becomes one or more eval sets: harmful sets measure attack success (ASR), benign sets measure
over-refusal, utility sets (with a scorer) measure what safety costs. A task may offer published protocols
(``protocol: paper``) that run it the way a paper did, and analysis probes built only when named (``img2text``: the
request's word embeddings in the image slot, ``mllm_safety.data.image_slot``).

| benchmark | path | sets (``<benchmark>_<mode>``) |
| --- | --- | --- |
| ``figstep`` | SafeBench ``safebench.csv`` (or ``SafeBench-Tiny.csv``) | ``image`` (FigStep attack), ``text`` |
| ``mmsafetybench`` | ``data/`` (``processed_questions/``, ``imgs/``) | ``sd_typo``, ``typo``, ``sd``, ``text``; probes
``img2text``, ``matched_ocr``, ``text2img``, ``white`` |
| ``vlguard`` | VLGuard ``test.json`` | ``safe_safe`` (benign), ``safe_unsafe``, ``unsafe`` |
| ``advbench`` | AdvBench ``harmful_behaviors.csv`` | ``text``, ``image`` (FigStep-rendered) |
| ``harmbench`` | a HarmBench behaviour CSV | ``text``, ``image`` (FigStep-rendered) |
| ``xstest`` | XSTest ``xstest_prompts.csv`` (or ``xstest_v2_prompts.csv``) | ``safe`` (benign), ``unsafe`` |
| ``demo`` | none (bundled) or a file of the demo layout | ``typographic``, ``text``, ``benign``,
``typographic_benign``, ``shapes`` (utility); probes ``img2text``, ``img2text_benign`` |
| ``world`` | none (bundled) or a file of its layout | ``text``, ``typographic``, ``benign_text``,
``benign_typographic``, ``transcription``, ``utility`` (utility); probes ``img2text``, ``benign_img2text`` |
| ``scienceqa`` | LLaVA's ScienceQA folder (``llava_test_CQM-A.json``, ``problems.json``, ``pid_splits.json``) |
``test`` (utility) |
| ``vizwiz`` | VizWiz-VQA ``val.json`` | ``val`` (utility) |
| ``mme`` | ``MME_Benchmark_release_version`` | ``perception``, ``cognition`` (utility) |
| ``pope`` | ``coco_pope_<split>.json`` or their folder | ``random``, ``popular``, ``adversarial`` (utility) |
"""

from mllm_safety.evaluation.sets import Task
from mllm_safety.evaluation.tasks import (
    advbench,
    demo,
    figstep,
    harmbench,
    mme,
    mmsafetybench,
    pope,
    scienceqa,
    vizwiz,
    vlguard,
    world,
    xstest,
)

_MODULES = (demo, world, figstep, mmsafetybench, vlguard, advbench, harmbench, xstest, scienceqa, vizwiz, mme, pope)
TASKS: dict[str, Task] = {module.TASK.name: module.TASK for module in _MODULES}
"""Benchmark name -> its task."""
