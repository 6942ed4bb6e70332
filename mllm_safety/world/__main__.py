from mllm_safety.world.driver import main

main()
