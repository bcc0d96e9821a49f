"""Tiny random-init encoders from configs, one per supported family (no downloads)."""
from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

VOCAB = 97


def bert_config(layers=2, hidden=32, heads=2, ffn=None, max_pos=64) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn or 4 * hidden, max_position_embeddings=max_pos,
    )


def make(family: str, layers=2, hidden=32, heads=2, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "bert":
        m = BertModel(bert_config(layers, hidden, heads))
    elif family == "bert_cls":
        m = BertForSequenceClassification(bert_config(layers, hidden, heads))
    elif family == "roberta":
        m = RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=4 * hidden,
                                       max_position_embeddings=66, pad_token_id=1))
    elif family == "distilbert":
        m = DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=heads,
                                             hidden_dim=4 * hidden, max_position_embeddings=64))
    elif family == "bart_encoder":
        m = BartModel(BartConfig(vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=1,
                                 encoder_attention_heads=heads, decoder_attention_heads=heads,
                                 encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden,
                                 max_position_embeddings=64)).get_encoder()
    else:
        raise KeyError(family)
    return m.eval()


FAMILIES = ("bert", "bert_cls", "roberta", "distilbert", "bart_encoder")


def inputs(batch: int, seq: int, seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1 and seq > 2:
        mask[-1, seq // 2:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def first_tensor(out) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out
