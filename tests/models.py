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
    elif family in _MORE:
        cfg, cls = _MORE[family](c, layers, hidden, heads)
    else:
        raise KeyError(family)
    if attn is not None:
        cfg._attn_implementation = attn
    m = cls(cfg)
    if family == "bart_encoder":
        m = m.get_encoder()
    return m.eval()


#: families beyond BERT's layout (issue 22): family -> (common kwargs, layers, hidden, heads) -> (config, class)
_MORE = {
    # Conv1d q/k/v and FFN (refused: qfx quantizes linears only)
    "squeezebert": lambda c, l, h, n: (tf.SqueezeBertConfig(**c, embedding_size=h, max_position_embeddings=64), tf.SqueezeBertModel),
    # local attention over chunks of the characters, downsampling Conv1d, deep encoder, upsampling
    "canine": lambda c, l, h, n: (tf.CanineConfig(hidden_size=h, num_hidden_layers=l, num_attention_heads=n, intermediate_size=2 * h,
                                                  max_position_embeddings=64, downsampling_rate=4, num_hash_functions=2,
                                                  num_hash_buckets=64, local_transformer_stride=4), tf.CanineModel),
    # span-based dynamic convolution beside self-attention (two linears per layer)
    "convbert": lambda c, l, h, n: (tf.ConvBertConfig(**c, embedding_size=h, max_position_embeddings=64, conv_kernel_size=3), tf.ConvBertModel),
    # a text and a layout stream, each with q/k/v/attn_out/FFN; its layout embedding needs hidden % 6 == 0
    "lilt": lambda c, l, h, n: (tf.LiltConfig(**{**c, "hidden_size": 48, "intermediate_size": 96}, max_position_embeddings=66,
                                              channel_shrink_ratio=4, max_2d_position_embeddings=64), tf.LiltModel),
    # BERT attention written as softmax(scores, dtype=float32).to(dtype)
    "splinter": lambda c, l, h, n: (tf.SplinterConfig(**c, max_position_embeddings=64, question_token_id=VOCAB - 1), tf.SplinterModel),
    "markuplm": lambda c, l, h, n: (tf.MarkupLMConfig(**c, max_position_embeddings=66, max_depth=8, xpath_unit_hidden_size=16,
                                                      max_xpath_tag_unit_embeddings=16, max_xpath_subs_unit_embeddings=16,
                                                      tag_pad_id=15, subs_pad_id=15), tf.MarkupLMModel),
    # bottleneck projections on each layer's input, stacked FFNs
    "mobilebert": lambda c, l, h, n: (tf.MobileBertConfig(**c, max_position_embeddings=64, embedding_size=16, intra_bottleneck_size=16,
                                                          true_hidden_size=16, num_feedforward_networks=2), tf.MobileBertModel),
    # two-stream relative attention in einsum over raw parameters (refused: no attention qfx knows)
    "xlnet": lambda c, l, h, n: (tf.XLNetConfig(vocab_size=VOCAB, d_model=h, n_layer=l, n_head=n, d_inner=2 * h), tf.XLNetModel),
    # sliding-window attention sized from the inputs' values (refused at capture: data-dependent)
    "longformer": lambda c, l, h, n: (tf.LongformerConfig(**c, max_position_embeddings=66, attention_window=4, pad_token_id=1), tf.LongformerModel),
}

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


#: the tiny sentence-transformers folders' vocabulary (tests/e2e/test_embeddings.py, test_throughput.py)
WORDS = [f"w{i}" for i in range(90)]


def write_st_folder(path, hidden=32, layers=2):
    """A random-init BERT + WordPiece tokenizer + pooling/normalize configs in ``path``."""
    import json

    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=4 * hidden, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return path
