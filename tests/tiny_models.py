"""Tiny random Hugging Face models built from configs, shared by the integration tests (nothing downloaded)."""

import transformers

VOCAB = 101


def llama_config(**overrides) -> "transformers.LlamaConfig":
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def llama_model(**overrides) -> "transformers.LlamaForCausalLM":
    return transformers.LlamaForCausalLM(llama_config(**overrides))


def bert_model(**overrides) -> "transformers.BertForSequenceClassification":
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    kwargs.update(overrides)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**kwargs))
