"""CompiledModel: the user-facing result of qfx.compile (same inputs and outputs as the model).

A call runs, in order:

1. :func:`qfx.capture.normalize_inputs`: the caller's arguments as the graph's inputs, checked
   once (metadata only, no device sync); tensors on another device are moved to the model's.
2. On a GPU: the CUDA graph of the call's (batch, seq) bucket is replayed
   (:class:`qfx.runtime.graphs.GraphPool`, captured on first use; inputs padded in, outputs
   sliced back and copied out). A shape outside every bucket, or a bucket whose capture
   failed, runs by direct launch, and ``runtime_report()`` says so.
3. Direct launch: the lean graph (:mod:`qfx.runtime.launch_plan`), whose integer ops call
   launchers bound at compile time.

Padding removal (``remove_padding="auto"``, the default: on for GPU targets; ``True``: on any
target; :mod:`qfx.passes.unpad`) makes a graph that runs its token-wise ops on the real tokens
only. Each call is routed first (:class:`qfx.runtime.packed.PaddingRouter`, from three numbers of
the mask on the host: free for a CPU mask, one small sync for a GPU one): a call with padding
runs packed (its token bucket's graph, or a direct launch sized on the host: no sync inside), a
call without padding, or one packing would not reproduce exactly (left padding or an empty row
under a pooler, a mask with values other than 0 / 1), runs the graph's padded twin
(:func:`qfx.runtime.packed.padded_twin`: what ``remove_padding=False`` computes).
``runtime_report()`` counts the calls per path and names the last call's.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule

from qfx.capture import CaptureInfo, normalize_inputs
from qfx.runtime.report import CompileReport
from qfx.runtime.buckets import Buckets, dim_roles, token_budget_batches
from qfx.runtime.graphs import GraphPool
from qfx.runtime.launch_plan import LaunchPlan, bind_launchers
from qfx.runtime.packed import NO_PADDING, PaddingRouter, Route, check_index_plumbing, packed_forward, packs_tokens, padded_twin
from qfx.schema import META_ATTENTION, META_FUSED_NORMS, META_FUSED_ROTATED_NORMS, META_UNPAD

__all__ = ["CompiledModel", "check_input_values"]


def check_input_values(inputs: dict[str, Any], where: str = "") -> None:
    """Refuse values no qfx model can run, with the fix: a list, tuple or numpy array where a
    tensor goes, or a meta tensor (a shape without data). ``where`` prefixes the names
    (``"example input "``)."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                raise ValueError(
                    f"{where}{name} is a meta tensor (a shape without data); pass real tensors, e.g. the "
                    "tokenizer's output with return_tensors='pt'"
                )
        elif isinstance(value, (list, tuple)) or hasattr(value, "__array__"):  # numpy arrays and alike
            kind = type(value).__name__ if isinstance(value, (list, tuple)) else f"{type(value).__module__}.{type(value).__name__}"
            raise ValueError(
                f"{where}{name} is a {kind}, not a torch.Tensor; pass torch.as_tensor({name}) "
                "(or tokenize with return_tensors='pt')"
            )


def _sequence_length(i: int, item: dict, names: list[str]) -> int:
    """The length of ``run_many``'s ``sequences[i]``: every input 1-D and of one length, at least 1."""
    lengths = set()
    for name in names:
        value = item.get(name) if isinstance(item, dict) else None
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            what = f"a {value.dim()}-D tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"run_many: sequences[{i}][{name!r}] is {what}; give each input of each sequence as "
                             "a 1-D tensor of its tokens (no batch dim, no padding)")
        lengths.add(int(value.shape[0]))
    if len(lengths) > 1:
        raise ValueError(f"run_many: the inputs of sequences[{i}] have lengths {sorted(lengths)}; give them one length")
    if lengths == {0}:
        raise ValueError(f"run_many: sequences[{i}] has no tokens (length 0); drop it, or keep at least one token "
                         "(a tokenizer adds [CLS] and [SEP] to an empty text)")
    return lengths.pop() if lengths else 0


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


class CompiledModel(nn.Module):
    """Runs the target graph (L5); ``report()`` says what runs where and in which precision.

    Args:
        graph_module: the L5 graph from the compile pipeline.
        report, capture, device: from ``qfx.compile``.
        cuda_graphs: replay CUDA graphs per shape bucket (default: on for CUDA devices).
        buckets: the :class:`qfx.runtime.buckets.Buckets` to pad calls into.
        target: the :class:`qfx.targets.Target` compiled for; checked against the GPU present.

    Inputs on the CPU given to a GPU model are copied to the GPU (the copy is part of the call's
    time); outputs keep the source model's structure (e.g. ``SequenceClassifierOutput``) and are
    never views of memory a later call overwrites. Under ``torch.no_grad()`` or
    ``torch.inference_mode()`` they are inference tensors; with grad enabled (the default) they
    are ordinary tensors (one copy each), so a trainable head on top can backpropagate.
    Inputs must be tensors with data (lists, numpy arrays and meta tensors are refused), and
    the dtypes are fixed at compile time (``.half()``, ``.to(dtype)`` are refused: compile
    with ``float_dtype=``).
    """

    def __init__(self, graph_module: GraphModule, report: CompileReport, capture: CaptureInfo,
                 device: torch.device, cuda_graphs: bool | None = None, buckets: Buckets | None = None,
                 target=None) -> None:
        super().__init__()
        self.graph_module = graph_module
        # An inference artifact: integer ops have no autograd formula, and float parameters
        # left in the graph must not ask for one (torch.export would trace a backward).
        graph_module.requires_grad_(False)
        self._report = report
        self._capture = capture
        self.device = device
        self._plan: LaunchPlan | None = None
        self._checked: dict[tuple, tuple[str, ...]] = {}
        self._graphs: GraphPool | None = None
        self._graphs_off = ""
        #: the path of the last call: a replayed graph's key ((batch, seq), + "dense" for a call
        #: with no padding, + "padded" or its token bucket with padding removal), or ("direct", why)
        self.last_path: tuple | None = None
        #: padding removal: the route of the last call (packed / padded and why), else None
        self.last_route: Route | None = None
        self._router: PaddingRouter | None = None
        self._twin: GraphModule | None = None
        if packs_tokens(graph_module):  # a packed graph (a loaded file too): its kernels trust these indices
            check_index_plumbing(graph_module)
            self._router = PaddingRouter(graph_module, dim_roles(graph_module, capture.input_names))
        on_gpu = device.type == "cuda"
        if target is not None and on_gpu and getattr(target, "family", None) is not None:
            # the kernels are chosen by the GPU present: refuse a plan made for another family
            # (an sm_86 INT4 plan on an H100) instead of silently running other kernels
            target.check_device(device)
        self.target = target
        if cuda_graphs is None:
            cuda_graphs = on_gpu
        if cuda_graphs and not on_gpu:
            raise ValueError(f"cuda_graphs=True needs a GPU target; this model runs on {device}")
        self._want_graphs = cuda_graphs
        self._buckets = (buckets or Buckets()).limited_to(capture.max_seq_len)
        if not cuda_graphs:
            self._graphs_off = "off (cuda_graphs=False)" if on_gpu else "CPU target"
        self.eval()

    # -- the parts, made on first use (after any .to() a user may apply) --------------------

    @property
    def launch_plan(self) -> LaunchPlan:
        if self._plan is None:
            self._plan = bind_launchers(self.graph_module)
        return self._plan

    def _padded_module(self) -> GraphModule:
        """Padding removal: the lean graph over every position (the padded twin), made once."""
        if self._twin is None:
            self._twin = padded_twin(self.launch_plan.module)
        return self._twin

    def _pool(self) -> GraphPool | None:
        if self._graphs is None and self._want_graphs and not self._graphs_off:
            roles = dim_roles(self.graph_module, self._capture.input_names)
            if roles.why_not:
                self._graphs_off = f"off: {roles.why_not}"
                return None
            dense = self.launch_plan.dense_module
            self._graphs = GraphPool(self.launch_plan.module.forward, roles, self._buckets, self.device,
                                     dense_forward=None if dense is None else dense.forward,
                                     token_index=self.launch_plan.token_index,
                                     padded_forward=self._padded_module().forward if self._router else None)
            if self._router is not None:  # calls replay bucketed graphs: the router weighs their token buckets
                self._router.buckets = self._buckets
        return self._graphs

    def report(self) -> CompileReport:
        return self._report

    def runtime_report(self) -> str:
        """How calls run: graphs captured per bucket, buckets that fell back, launchers bound,
        and what the GPU-only passes did (attention mask form, fused LayerNorm + quantize)."""
        lines = []
        meta = self.graph_module.meta
        if META_ATTENTION in meta:
            lines.append(f"attention: {meta[META_ATTENTION]}")
        lines.append(f"padding removal: {meta.get(META_UNPAD, 'off (remove_padding=False)')}")
        if self._router is not None:
            lines.append(f"  {self._router.describe()}")
        if META_FUSED_NORMS in meta:
            n, why = meta[META_FUSED_NORMS]
            rotated = meta.get(META_FUSED_ROTATED_NORMS, 0)
            lines.append(f"add + LayerNorm + quantize fused at {n} site(s)"
                         + (f" ({rotated} with the input rotation)" if rotated else "") + (f"; not fused: {why}" if why else ""))
        if self._graphs is not None:
            tokens = (f"; token buckets: multiples of {self._buckets.token_step}, "
                      f"{self._buckets.token_buckets} per doubling of the token count"
                      if self._graphs.token_index is not None else "")
            lines.append(f"CUDA graphs: {len(self._graphs.graphs)} bucket(s) captured "
                         f"{sorted(self._graphs.graphs, key=str)}; buckets batch={self._buckets.batch} "
                         f"seq={self._buckets.seq}{tokens}")
            for b, why in self._graphs.failed.items():
                lines.append(f"  bucket {b}: direct launch, capture failed: {why}")
        else:
            lines.append(f"CUDA graphs: {self._graphs_off or 'not used yet'}")
        if self.last_path is not None:
            direct = self.last_path[0] == "direct"
            route = f"{self.last_route.label}, " if self.last_route is not None else ""
            lines.append(f"last call: {route}{'direct launch, ' + self.last_path[1] if direct else f'graph {self.last_path}'}")
        if self.device.type == "cuda":
            from qfx.backends.cutlass._library import pdl

            lines.append(f"programmatic dependent launch of qfx's CUDA kernels: {pdl()}")
        if self._plan is not None:
            lines.append(f"direct launch: {len(self._plan.bound)} integer op(s) bound to launchers")
            for name, why in self._plan.unbound.items():
                lines.append(f"  {name}: {why}")
        return "\n".join(lines)

    def _normalize(self, args: tuple, kwargs: dict) -> dict:
        """:func:`normalize_inputs`, memoised on the inputs' metadata: its checks read only
        names, shapes, dtypes and devices, so a call like an earlier complete call (every input
        given, by position or keyword, none left to a default) skips them. The memo keeps the
        names the positional arguments were bound to (30 µs a call saved on the H100's host for
        a model called as ``compiled(x)``)."""
        names = self._capture.input_names
        key = None
        if len(args) + len(kwargs) == len(names):
            try:
                key = (tuple((v.shape, v.dtype, v.device) for v in args),
                       tuple((k, v.shape, v.dtype, v.device) for k, v in kwargs.items()))
            except AttributeError:  # a non-tensor input: no memo
                key = None
            if key is not None:
                bound = self._checked.get(key)
                if bound is not None:
                    given = dict(zip(bound, args), **kwargs)
                    return {name: given[name] for name in names}
        params = [n for n, p in inspect.signature(self._capture.source.forward).parameters.items()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        check_input_values(dict(zip(params, args), **kwargs))
        out = normalize_inputs(self._capture, args, kwargs)
        if key is not None:
            # the names the positional arguments took: the inputs that are those very tensors
            bound = tuple(next((n for n in names if out[n] is a), None) for a in args)
            if None not in bound and len(set(bound)) == len(bound) and not set(bound) & set(kwargs):
                if len(self._checked) > 256:
                    self._checked.clear()
                self._checked[key] = bound
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._normalize(args, kwargs)
        with torch.inference_mode():
            out = self._run(kwargs)
        if torch.is_grad_enabled():
            # Inference tensors cannot take part in autograd (``head(out).backward()`` would fail on
            # them): with grad enabled, return ordinary tensors, at one copy per output tensor.
            # Under torch.no_grad() / torch.inference_mode() the outputs come without that copy.
            out = pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, out)
        return out

    def _run(self, kwargs: dict) -> Any:
        """One call on the normalized inputs, inside inference mode."""
        pool = self._pool()
        route = None
        mask = kwargs.get("attention_mask")
        if self._router is not None and isinstance(mask, torch.Tensor):
            # before the mask is moved: free for a CPU mask, one small sync for a GPU one
            route = self._router.route(mask)
            dense = route.why == NO_PADDING and self.launch_plan.dense_module is not None
        else:
            dense = pool is not None and self._all_attended(kwargs)
        self.last_route = route
        padded = route is not None and route.path == "padded"
        kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
        if pool is not None:
            ok, out = pool.run(kwargs, dense, None if route is None else route.tokens, padded)
            if ok:
                self.last_path = pool.last_key
                return out
            self.last_path = ("direct", "no bucket holds this shape" if pool.last_key is None else
                              f"bucket {pool.last_key} failed to capture")
        else:
            self.last_path = ("direct", self._graphs_off or "CUDA graphs off")
        if padded:
            return self._padded_module().forward(**kwargs)
        if route is None:
            return self.launch_plan.module.forward(**kwargs)
        return packed_forward(self.launch_plan, route.tokens, kwargs)

    def run_many(self, sequences: list[dict[str, torch.Tensor]], token_budget: int = 16384) -> list[Any]:
        """Run many sequences at throughput; one output per sequence, in the caller's order.

        Each item holds one sequence's inputs as 1-D tensors of its length (a tokenizer's output
        without padding, ``attention_mask`` included). Batches are length-sorted and cut by a
        budget of padded positions (:func:`qfx.runtime.buckets.token_budget_batches`), padded on
        the host (pinned for a GPU model: the runtime counts tokens there, copies asynchronously)
        and run with no device sync between them; each output keeps the model's structure with
        its batch and sequence dims cut to the sequence (``last_hidden_state`` [length, F]).

        Example::

            >>> enc = [{k: v[0] for k, v in tok(t, return_tensors="pt").items()} for t in texts]
            >>> outs = compiled.run_many(enc)          # outs[i].last_hidden_state: [len_i, F]
        """
        roles = dim_roles(self.graph_module, self._capture.input_names)
        if roles.why_not or not roles.has_seq:
            raise ValueError(f"run_many: this model's inputs have no [batch, seq] dims to pack ({roles.why_not})")
        names = [n for n in self._capture.input_names if n in sequences[0]] if sequences else []
        if sequences and not names:
            raise ValueError(f"run_many: sequences[0] holds none of the model's inputs {list(self._capture.input_names)}")
        lengths = [_sequence_length(i, item, names) for i, item in enumerate(sequences)]
        pin = self.device.type == "cuda"
        results: list[Any] = [None] * len(sequences)
        with torch.inference_mode():
            for rows in token_budget_batches(lengths, token_budget, self._buckets):
                batch = {n: torch.nn.utils.rnn.pad_sequence([sequences[i][n] for i in rows], batch_first=True)
                         for n in names}
                out = self(**{n: t.pin_memory() if pin else t for n, t in batch.items()})
                leaves, spec = pytree.tree_flatten(out)
                for j, i in enumerate(rows):
                    cut = [leaf if r is None else leaf[tuple(j if d == "b" else slice(0, lengths[i]) if d == "s"
                                                             else slice(None) for d in r)]
                           for leaf, r in zip(leaves, roles.outputs)]
                    results[i] = pytree.tree_unflatten(cut, spec)
        return results

    #: a mask on the GPU is read back (a device sync) only for calls this large, where dropping
    #: the attention bias saves more than the sync costs
    DENSE_CHECK_TOKENS = 4096

    def _all_attended(self, kwargs: dict) -> bool:
        """Whether attention_mask is all ones (no padding anywhere), when that is cheap to know."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or self._plan is None or self._plan.dense_module is None:
            return False
        if mask.device.type != "cpu" and mask.numel() < self.DENSE_CHECK_TOKENS:
            return False
        return bool(mask.all())

    # -- dtypes are fixed at compile time -----------------------------------------------------

    def _refuse_dtype_change(self, call: str) -> None:
        raise ValueError(
            f"CompiledModel{call}: a compiled model's dtypes are fixed when it is compiled (integer weight "
            f"codes, their scales, float parts in {self._report.run_dtype}); compile again with "
            "qfx.compile(..., float_dtype=torch.float16 / torch.bfloat16 / torch.float32) instead"
        )

    def half(self) -> "CompiledModel":
        self._refuse_dtype_change(".half()")

    def bfloat16(self) -> "CompiledModel":
        self._refuse_dtype_change(".bfloat16()")

    def float(self) -> "CompiledModel":
        self._refuse_dtype_change(".float()")

    def double(self) -> "CompiledModel":
        self._refuse_dtype_change(".double()")

    def to(self, *args: Any, **kwargs: Any) -> "CompiledModel":
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_dtype_change(f".to({dtype})")
        return super().to(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickle.dumps / torch.save would write a pickle (code on load) of bound launchers;
        # the qfx file format is safetensors + JSON, loaded without running anything
        raise TypeError("a qfx CompiledModel cannot be pickled (pickle.dumps, torch.save, copy.deepcopy): save it "
                        "with qfx.save(model, 'model.qfx.safetensors') and read it back with qfx.load(path)")

    def train(self, mode: bool = True) -> "CompiledModel":
        if mode:
            raise ValueError("a CompiledModel is for inference; train the model returned by qfx.prepare_qat instead")
        return super().train(False)
