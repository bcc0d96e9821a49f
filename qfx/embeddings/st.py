"""sentence-transformers in and out: compile or QAT-prepare a ``SentenceTransformer``.

A ``SentenceTransformer`` is a pipeline of modules: ``Transformer`` (tokenizer + HF encoder)
-> ``Pooling`` -> (``Dense``) -> (``Normalize``). qfx replaces only the HF encoder inside the
``Transformer`` module by an :class:`EncoderAdapter` around the qfx model (a QAT graph or a
:class:`qfx.CompiledModel`) and keeps every other module, so ``encode(...)`` of the result is
the original's own code: the same tokenizer and truncation, pooling, normalization, batching
(length-sorted batches of ``batch_size``), progress bar and output conversions.

sentence-transformers is an optional dependency (``pip install "qfx[embeddings]"``); nothing
here imports it unless a function is called on a model that needs it.

Example::

    >>> st = SentenceTransformer(str(qfx.models.minilm_path()), device="cpu")
    >>> int8 = qfx.compile(st, mode="int8", target="cpu")        # a SentenceTransformer
    >>> int8.encode(["a fresh, witty film"], normalize_embeddings=True).shape
    (1, 384)
"""
from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from qfx.api import WrapperAdapter, compile as qfx_compile, is_qat_model, prepare_qat, register_wrapper_adapter

__all__ = [
    "EXTRA",
    "EncoderAdapter",
    "require_sentence_transformers",
    "is_sentence_transformer",
    "encoder_of",
    "example_inputs",
    "compile_sentence_transformer",
    "prepare_qat_sentence_transformer",
    "ThroughputEncode",
]

#: the pip extra that installs the optional dependency
EXTRA = 'pip install "qfx[embeddings]"  (or: pip install "sentence-transformers>=3")'
#: two texts of different lengths: capture needs a batch > 1 and a sequence > 1 to keep both dynamic
_EXAMPLE_TEXTS = ("qfx compiles sentence encoders to integer tensor cores.", "A short one.")


def require_sentence_transformers():
    """Import sentence_transformers, or raise an ImportError that names the extra to install."""
    try:
        import sentence_transformers
    except ImportError as e:
        raise ImportError(
            f"qfx.embeddings needs the optional dependency sentence-transformers (>= 3): {EXTRA}"
        ) from e
    return sentence_transformers


def is_sentence_transformer(model: Any) -> bool:
    """True for a ``sentence_transformers.SentenceTransformer``.

    Never imports the optional package: a model can only be one if the package is imported.
    """
    st = sys.modules.get("sentence_transformers")
    return st is not None and isinstance(model, st.SentenceTransformer)


class EncoderAdapter(nn.Module):
    """Stands where the HF encoder stood inside a ``SentenceTransformer``'s ``Transformer``.

    Forwards the inputs the qfx model was captured with (``input_ids``, ``attention_mask``,
    ``token_type_ids``; sentence-transformers' bookkeeping keys and ``return_dict`` are
    dropped) and returns a ``BaseModelOutput`` whose ``last_hidden_state`` ([B, S, D]) is cast
    to ``output_dtype`` (the original encoder's dtype), so pooling and ``encode``'s results
    keep the original's dtype whatever the compiled float parts run in.

    Args:
        inner: a :func:`qfx.prepare_qat` graph or a :class:`qfx.CompiledModel`.
        config: the original encoder's HF config (sentence-transformers reads it).
        output_dtype: dtype of the returned hidden states.
    """

    def __init__(self, inner: nn.Module, config: Any, output_dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.config = config
        self.output_dtype = output_dtype
        self._input_names = frozenset(_capture_of(inner).input_names)

    @property
    def device(self) -> torch.device:
        """Where the qfx model runs (sentence-transformers puts the inputs there)."""
        dev = getattr(self.inner, "device", None)
        return dev if isinstance(dev, torch.device) else _capture_of(self.inner).device

    @property
    def dtype(self) -> torch.dtype:
        return self.output_dtype

    def forward(self, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutput

        if args:  # sentence-transformers < 5 may pass input_ids positionally
            kwargs = {"input_ids": args[0], **kwargs}
        inputs = {k: v for k, v in kwargs.items() if k in self._input_names and v is not None}
        out = self.inner(**inputs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
        return BaseModelOutput(last_hidden_state=hidden.to(self.output_dtype))

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "a qfx model inside a SentenceTransformer cannot be saved with SentenceTransformer.save: "
            "save the float SentenceTransformer and run qfx.compile / qfx.prepare_qat again after loading it"
        )


def _capture_of(model: nn.Module):
    from qfx.capture import capture_info
    from qfx.runtime import CompiledModel

    if isinstance(model, CompiledModel):
        return model._capture
    return capture_info(model)


def _transformer_slot(st) -> tuple[nn.Module, str]:
    """(the module holding the HF encoder, its attribute name): ``model`` in sentence-transformers
    >= 6, ``auto_model`` before. Found by identity, so both layouts work."""
    first = st[0]
    for name, child in first.named_children():
        if _is_encoder(child) or isinstance(child, EncoderAdapter):
            return first, name
    raise ValueError(
        f"model: the first module of this SentenceTransformer is {type(first).__name__} and holds no "
        "transformers encoder; qfx compiles SentenceTransformers whose first module is a Transformer "
        "(BERT-family encoder), e.g. all-MiniLM-L6-v2"
    )


def _is_encoder(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def encoder_of(st) -> nn.Module:
    """The encoder inside ``st``: the HF model, or the qfx model of an :class:`EncoderAdapter`."""
    holder, name = _transformer_slot(st)
    child = getattr(holder, name)
    return child.inner if isinstance(child, EncoderAdapter) else child


def example_inputs(st, texts: tuple[str, ...] | list[str] = _EXAMPLE_TEXTS, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A tokenized batch of ``texts`` by ``st``'s own tokenizer (the inputs ``encode`` passes).

    Example::

        >>> example_inputs(st)["input_ids"].shape          # [2, S]
    """
    tok = st[0].tokenizer
    max_len = getattr(st, "max_seq_length", None) or 512
    batch = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    dev = device if device is not None else st.device
    return {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _replace_encoder(st, adapter: EncoderAdapter):
    """A copy of ``st`` with ``adapter`` in the encoder's place; the encoder itself is not copied
    (deepcopy's memo maps it to the adapter), the other modules are."""
    holder, name = _transformer_slot(st)
    old = getattr(holder, name)
    out = copy.deepcopy(st, {id(old): adapter})
    return out


def _check_st(model: Any, example_args: tuple) -> None:
    require_sentence_transformers()
    if example_args:
        raise ValueError(
            f"example_args: a SentenceTransformer takes texts, not positional tensors (got {len(example_args)} "
            "positional arguments); leave example_args out (qfx tokenizes two example sentences) or pass "
            "example_kwargs=qfx.embeddings.example_inputs(model, texts)"
        )


def prepare_qat_sentence_transformer(
    st,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    config=None,
    skip: tuple[str, ...] = (),
    features: bool = True,
):
    """A copy of ``st`` whose encoder is :func:`qfx.prepare_qat` of the original (trainable).

    ``encode`` of the result runs the fake-quant twin (what the compiled model will compute);
    its parameters train like any module's; ``qfx.compile(result, mode=...)`` compiles it. With
    ``features`` the QAT graph gets feature taps (:mod:`qfx.passes.expose_features`: identities
    that the Rep loss of :func:`qfx.embeddings.distill` reads). ``st`` itself is left untouched.

    Example::

        >>> qat = qfx.prepare_qat(st, config=qfx.QuantConfig(4, 4, symmetric=False))
        >>> qat.encode(["some text"]).shape              # (1, 384)
    """
    from qfx.passes.expose_features import expose_features

    _check_st(st, example_args)
    encoder = encoder_of(st)
    if not _is_encoder(encoder):
        raise ValueError("model: this SentenceTransformer already holds a qfx model; pass the original float SentenceTransformer")
    kwargs = example_kwargs if example_kwargs is not None else example_inputs(st)
    gm = prepare_qat(encoder, example_kwargs=kwargs, config=config, skip=skip)
    if features:
        gm = expose_features(gm)
    return _replace_encoder(st, EncoderAdapter(gm, encoder.config, _float_dtype(encoder)))


def compile_sentence_transformer(
    st,
    mode: str = "int4",
    target: str = "cpu",
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    config=None,
    skip: tuple[str, ...] = (),
    float_dtype: torch.dtype | None = None,
    remove_padding: bool | str = "auto",
):
    """A copy of ``st`` whose encoder is ``qfx.compile`` of its encoder (float or QAT-prepared).

    The other modules (pooling, dense, normalize) move to the target's device and keep their
    dtype; ``encode`` returns what the original returns (same dtype), computed by the integer
    model. Arguments are those of :func:`qfx.compile`.

    Example::

        >>> int4 = qfx.compile(qat_st, mode="int4", target="sm_89")
        >>> int4.encode(texts, batch_size=64, show_progress_bar=True)
    """
    _check_st(st, example_args)
    encoder = encoder_of(st)
    if not (_is_encoder(encoder) or is_qat_model(encoder)):
        raise ValueError("model: this SentenceTransformer already holds a compiled qfx model; compile the float or QAT one")
    holder, name = _transformer_slot(st)
    hf_config = getattr(holder, name).config
    if is_qat_model(encoder):
        kwargs = example_kwargs  # None: compile uses the QAT graph's own example
        out_dtype = getattr(holder, name).output_dtype
    else:
        kwargs = example_kwargs if example_kwargs is not None else example_inputs(st, device=torch.device("cpu"))
        out_dtype = _float_dtype(encoder)
    compiled = qfx_compile(encoder, mode=mode, target=target, example_kwargs=kwargs, config=config, skip=skip,
                           float_dtype=float_dtype, remove_padding=remove_padding)
    out = _replace_encoder(st, EncoderAdapter(compiled, hf_config, out_dtype))
    # Pooling / Dense / Normalize run where the encoder's outputs are; the adapter is already there.
    for module in list(out)[1:]:
        module.to(compiled.device)
    if compiled.device.type == "cuda":  # host-bound there: the instance's encode is the throughput path
        out.encode = ThroughputEncode(out)
    return out.eval()


#: feature values that do not depend on the texts (sentence-transformers' ``modality="text"``)
_CONSTANT = (str, int, float, bool, type(None))


class ThroughputEncode:
    """``encode`` of a compiled SentenceTransformer: the same embeddings as its own ``encode``,
    computed at throughput, returned in the caller's order.

    sentence-transformers' loop is host-bound around a fast model: per batch of ``batch_size``
    texts it tokenizes, runs, and copies the result to the host (a device sync), so the GPU
    waits for the tokenizer and the tokenizer for the GPU. Here:

    * the texts are tokenized once, a chunk of :attr:`chunk_texts` at a time, by the fast
      tokenizer's Rust backend as the model's own preprocessing sets it up, checked against the
      preprocessing on a sample of each chunk (:mod:`qfx.embeddings.fast_tokenize`; otherwise by the
      preprocessing itself: :attr:`tokenized_by` says which); within a chunk, batches are cut by a budget of padded
      positions (``token_budget``, longest first: :func:`qfx.runtime.buckets.token_budget_batches`),
      not by a count of texts, and each batch's inputs are rows of the chunk's, cut to the batch's
      longest text: exactly what the preprocessing makes of the batch alone (right padding; any
      other layout tokenizes each batch by itself);
    * each batch is kept on the host in pinned memory and given to the compiled model as host
      tensors: it counts the real tokens on the host (no sync to choose a token bucket) and copies
      them asynchronously; pooling / dense / normalize run on the GPU;
    * nothing is read back until the end: one copy of all embeddings, restored to the caller's
      order. Tokenizing chunk i + 1 overlaps the GPU running chunk i.

    ``batch_size``, when given, caps the texts per batch (memory); ``show_progress_bar`` shows
    the batches. It is the compiled model's ``encode`` on a GPU; on the CPU ``encode`` stays
    sentence-transformers' own loop, whose batches (hence padding) are those the QAT twin sees, so
    the two agree bit for bit there. Other batches pad differently: embeddings agree up to float
    rounding.

    Calls this path does not serve (prompts, ``output_value`` other than sentence embeddings,
    ``precision``, non-text inputs, ``device``, multi-process pools) go to the original ``encode``.
    """

    _SERVED = frozenset({"batch_size", "show_progress_bar", "convert_to_numpy", "convert_to_tensor",
                         "normalize_embeddings", "output_value", "precision", "device"})

    def __init__(self, st, token_budget: int = 16384) -> None:
        self.st = st
        self.token_budget = token_budget
        self.original = type(st).encode.__get__(st)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any):
        texts = [inputs] if isinstance(inputs, str) else inputs
        served = (not args and set(kwargs) <= self._SERVED and kwargs.get("output_value", "sentence_embedding") ==
                  "sentence_embedding" and kwargs.get("precision", "float32") == "float32"
                  and kwargs.get("device") is None
                  and isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts))
        if not served:
            return self.original(inputs, *args, **kwargs)
        emb = self.embed(list(texts), kwargs.get("batch_size"), bool(kwargs.get("show_progress_bar")))
        if kwargs.get("normalize_embeddings"):
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        if isinstance(inputs, str):
            emb = emb[0]
        if kwargs.get("convert_to_tensor"):
            return emb
        return emb.float().cpu().numpy() if kwargs.get("convert_to_numpy", True) else list(emb)

    def embed(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """[len(texts), D] sentence embeddings on the model's device, in the order of ``texts``."""
        from qfx.runtime.buckets import Buckets

        st = self.st
        holder, name = _transformer_slot(st)
        adapter = getattr(holder, name)
        compiled = adapter.inner
        device = compiled.device
        names = set(_capture_of(compiled).input_names)
        buckets = getattr(compiled, "_buckets", None) or Buckets()
        if batch_size:  # the caller's cap on texts per batch
            buckets = Buckets(tuple(b for b in buckets.batch if b < batch_size) + (batch_size,), buckets.seq)
        bar = None
        if progress:
            from tqdm.autonotebook import tqdm

            bar = tqdm(total=len(texts), desc="Batches", unit="text")
        pin = device.type == "cuda"
        outs, order = [], []
        with torch.inference_mode():
            for first in range(0, len(texts), self.chunk_texts):
                chunk = texts[first:first + self.chunk_texts]
                # the host tokenizes this chunk while the GPU still runs the previous one's batches
                for rows, features in self._batches(chunk, buckets, names):
                    host = {k: (v.pin_memory() if pin else v) for k, v in features.items() if k in names}
                    out = compiled(**host)  # host tensors: the runtime counts tokens there, copies async
                    hidden = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
                    features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                for k, v in {**features, **host}.items()}
                    features["token_embeddings"] = hidden.to(adapter.output_dtype)
                    for module in list(st)[1:]:
                        features = module(features)
                    outs.append(features["sentence_embedding"])
                    order.extend(first + i for i in rows)
                    if bar is not None:
                        bar.update(len(rows))
            if bar is not None:
                bar.close()
            emb = torch.cat(outs)
            return torch.empty_like(emb).index_copy_(0, torch.tensor(order, device=emb.device), emb)

    #: texts per call of the model's preprocessing (tokenizer): a chunk is tokenized once, its
    #: batches are slices of it, and tokenizing the next chunk overlaps the GPU running this one
    chunk_texts: int = 4096
    #: how the last chunk was tokenized (:func:`qfx.embeddings.fast_tokenize.tokenize_chunk` or the preprocessing, and why)
    tokenized_by: str = ""

    def _batches(self, texts: list[str], buckets, names: set[str]):
        """(rows of ``texts``, the model's inputs for them) per token-budget batch, longest first.

        The inputs are exactly what the model's own preprocessing makes of those texts: with right
        padding to the longest text (what sentence-transformers' tokenizers do), the batch of rows
        R tokenized alone equals rows R of the whole chunk tokenized at once, cut to R's longest;
        the chunk is tokenized once (values that are not tensors must be constants, e.g.
        ``modality="text"``). Any other layout (left padding, a fixed or rounded width, per-text
        lists) tokenizes each batch by itself."""
        from qfx.runtime.buckets import token_budget_batches

        from qfx.embeddings.fast_tokenize import tokenize_chunk

        st = self.st
        preprocess = getattr(st, "preprocess", None) or st.tokenize
        whole, why = tokenize_chunk(st, texts, preprocess)
        if whole is None:
            self.tokenized_by = f"the model's preprocessing ({why})"
            whole = preprocess(texts)
        else:
            self.tokenized_by = "the fast tokenizer's Rust backend (checked against the preprocessing)"
        mask = whole.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == len(texts)):
            lengths, sliceable = [len(ids) for ids in st.tokenizer(
                texts, truncation=True, max_length=st.max_seq_length)["input_ids"]], False
        else:
            real = mask.sum(1, keepdim=True)
            lengths = real.flatten().tolist()
            # right padding to the longest text: every row's mask is 1s then 0s, and some row fills the width
            sliceable = (max(lengths, default=0) == mask.shape[1]
                         and bool((mask == (torch.arange(mask.shape[1]) < real)).all())
                         and all(v.shape == mask.shape if isinstance(v, torch.Tensor) else isinstance(v, _CONSTANT)
                                 for v in whole.values()))
        for rows in token_budget_batches(lengths, self.token_budget, buckets):
            if sliceable:
                index, width = torch.tensor(rows), max(lengths[i] for i in rows)
                # cut, then pick rows: index_select writes a new contiguous tensor (a strided slice would
                # make the pinned host-to-device copy of each input a staged, synchronous one)
                yield rows, {k: v[:, :width].index_select(0, index) if isinstance(v, torch.Tensor) else v
                             for k, v in whole.items()}
            else:
                yield rows, preprocess([texts[i] for i in rows])


def _float_dtype(encoder: nn.Module) -> torch.dtype:
    p = next((p for p in encoder.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _encode_texts(st, texts) -> Any:
    """One ``encode`` of ``texts`` (a non-empty list of strings): how calibration runs a
    SentenceTransformer (:func:`qfx.train.gptq_init.gptq_init`)."""
    texts = list(texts) if not isinstance(texts, str) else [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calibration for a SentenceTransformer is a non-empty list of texts")
    return st.encode(texts, batch_size=64, show_progress_bar=False)


# qfx.prepare_qat / qfx.compile / gptq_init reach SentenceTransformers through this adapter
# (qfx.api imports nothing of qfx.embeddings)
register_wrapper_adapter(WrapperAdapter(
    name="SentenceTransformer",
    matches=is_sentence_transformer,
    encoder_of=encoder_of,
    prepare_qat=prepare_qat_sentence_transformer,
    compile=compile_sentence_transformer,
    run=_encode_texts,
))
