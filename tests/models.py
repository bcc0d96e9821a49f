"""Tiny random-init encoders from configs, one per supported family (no downloads)."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
HIDDEN, LAYERS, HEADS = 32, 2, 2


def bert_config(layers=2, hidden=32, heads=2, ffn=None, max_pos=64) -> tf.BertConfig:
    return tf.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn or 4 * hidden, max_position_embeddings=max_pos,
    )


def _common(layers, hidden, heads) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden)


def make(family: str, layers=LAYERS, hidden=HIDDEN, heads=HEADS, seed=0, attn: str | None = None) -> torch.nn.Module:
    """A random-init ``family`` encoder in eval mode; ``attn`` sets ``attn_implementation``."""
    torch.manual_seed(seed)
    c = _common(layers, hidden, heads)
    if family == "bert":
        cfg, cls = bert_config(layers, hidden, heads), tf.BertModel
    elif family == "bert_cls":
        cfg, cls = bert_config(layers, hidden, heads), tf.BertForSequenceClassification
    elif family == "roberta":
        cfg, cls = tf.RobertaConfig(**c, max_position_embeddings=66, pad_token_id=1), tf.RobertaModel
    elif family == "xlm_roberta":
        cfg, cls = tf.XLMRobertaConfig(**c, max_position_embeddings=66, pad_token_id=1), tf.XLMRobertaModel
    elif family == "electra":
        cfg = tf.ElectraConfig(**c, embedding_size=16, max_position_embeddings=64)  # embeddings_project: an "other" linear
        cls = tf.ElectraModel
    elif family == "albert":
        cfg = tf.AlbertConfig(**c, embedding_size=16, max_position_embeddings=64)  # one layer group, shared weights
        cls = tf.AlbertModel
    elif family == "deberta_v2":
        cfg = tf.DebertaV2Config(**c, max_position_embeddings=64, relative_attention=True, position_buckets=16,
                                 pos_att_type=["p2c", "c2p"], max_relative_positions=32)
        cls = tf.DebertaV2Model
    elif family == "mpnet":
        cfg, cls = tf.MPNetConfig(**c, max_position_embeddings=66, pad_token_id=1), tf.MPNetModel
    elif family == "modernbert":
        cfg = tf.ModernBertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=1)
        cls = tf.ModernBertModel
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=heads,
                                  hidden_dim=4 * hidden, max_position_embeddings=64)
        cls = tf.DistilBertModel
    elif family == "bart_encoder":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=1,
                            encoder_attention_heads=heads, decoder_attention_heads=heads,
                            encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden, max_position_embeddings=64)
        cls = tf.BartModel
    else:
        raise KeyError(family)
    if attn is not None:
        cfg._attn_implementation = attn
    m = cls(cfg)
    if family == "bart_encoder":
        m = m.get_encoder()
    return m.eval()


#: the families the capture and pass tests sweep (SDPA attention, 6 linears per layer)
FAMILIES = ("bert", "bert_cls", "roberta", "distilbert", "bart_encoder")
#: every family qfx supports (tests/e2e/test_families.py): BERT-like and beyond
ALL_FAMILIES = ("bert", "bert_cls", "roberta", "xlm_roberta", "distilbert", "electra", "albert",
                "deberta_v2", "mpnet", "modernbert", "bart_encoder")


def inputs(batch: int, seq: int, seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1 and seq > 2:
        mask[-1, seq // 2:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def first_tensor(out) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out
