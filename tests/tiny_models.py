"""The tiny random LLM the tests build (SmolLM2's architecture and tokenizer, 2 narrow layers)."""

TINY_LLM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}
