from mllm_safety.experiments.runner import main

main()
