"""expose_features reads roles without writing them: the invariant its module doc states
(only FeatureTap nodes are added; the metadata of every other node is unchanged)."""
from __future__ import annotations

import torch

import qfx
from models import inputs, make
from qfx.passes.annotate import annotate, linear_infos
from qfx.passes.expose_features import FeatureRecorder, expose_features
from qfx.schema import META_LINEAR, linear_nodes


def _meta(gm):
    return {n.name: dict(n.meta) for n in gm.graph.nodes}


def test_a_bare_capture_is_tapped_from_roles_read_not_written():
    batch = inputs(2, 8)
    gm = qfx.capture(make("bert", layers=2), example_kwargs=batch)
    before = _meta(gm)
    ffn_out = [n.name for n, i in linear_infos(gm, None).items() if i.role == "ffn_out"]
    expose_features(gm)
    assert not any(META_LINEAR in n.meta for n in linear_nodes(gm))  # no roles left behind
    assert all(_meta(gm)[name] == meta for name, meta in before.items())
    with FeatureRecorder(gm) as rec:
        gm(**batch)
    assert rec.num_layers == 2 and len(ffn_out) == 2
    # hidden{i+1} is the layer output after layer i's ffn_out (post-LN: the LayerNorm after its add)
    assert torch.equal(rec.hidden[2], gm(**batch).last_hidden_state)


def test_an_annotated_graph_keeps_its_own_infos():
    batch = inputs(2, 8)
    gm = qfx.capture(make("bert", layers=2), example_kwargs=batch)
    annotate(gm, qfx.QuantConfig(4, 4))
    infos = {n.name: n.meta[META_LINEAR] for n in linear_nodes(gm)}
    expose_features(gm)
    assert {n.name: n.meta[META_LINEAR] for n in linear_nodes(gm)} == infos
