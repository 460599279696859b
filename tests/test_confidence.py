"""Confidence measures: values in [0, 1], exactly what they claim to compute, and auto mode's contract."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sortedchat import SortedChatError
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine import confidence as c
from sortedchat.engine.context import encode_chat
from sortedchat.loading import LoadOptions, load_sorted_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def calibrated(tiny_dir, tmp_path_factory):
    """A copy of the tiny model with a trained exit classifier (so every measure can be built)."""
    path = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(tiny_dir, path)
    sm = load_sorted_model(str(path), LoadOptions(device="cpu", exits=[2, 4, 6]))
    g = torch.Generator().manual_seed(0)
    n, hidden = 64, sm.model.config.hidden_size
    agree = torch.rand(2, n, generator=g) > 0.5
    subset = torch.randn(2, n, c.SUBSET_FEATURES, generator=g)
    states = torch.randn(2, n, hidden, generator=g).half()
    c.ExitClassifier.trained([2, 4], states, subset, agree, steps=5).save(path)
    return load_sorted_model(str(path), LoadOptions(device="cpu", exits=[2, 4, 6]))


def tokens(sm, mode, n=12):
    session = ChatSession(sm, mode)
    session.stop_ids = set()
    events = list(session.generate_ids(encode_chat(sm, MESSAGES), SamplingConfig(max_new_tokens=n)))
    return [e.token_id for e in events], [e.exit_layer for e in events], session.last_stats


@pytest.mark.parametrize("name", sorted(c.MEASURES))
def test_measure_values_lie_in_unit_interval(calibrated, name):
    sm = calibrated
    measure = c.make_measure(name, sm)
    ids = encode_chat(sm, MESSAGES)
    with torch.inference_mode():
        out = sm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        measure.prepare(ids)
        for e in sm.exits[:-1]:
            conf, logits = measure(out.hidden_states[e][:, -1], e)
            assert 0.0 <= conf <= 1.0
            assert logits is None or logits.shape[-1] == sm.model.config.vocab_size
        measure.observe(5, out.logits[0, -1])


@pytest.mark.parametrize("name", sorted(c.MEASURES))
def test_auto_at_threshold_one_equals_full_depth_without_checks(calibrated, name, monkeypatch):
    full, _, _ = tokens(calibrated, Mode.fixed())
    monkeypatch.setattr(calibrated.config, "confidence", name)  # the measure sortedchat.json names
    got, exits, stats = tokens(calibrated, Mode.auto(threshold=1.0))
    assert got == full and set(exits) == {6}
    assert stats.checks == 0  # an exit that cannot pass is not checked


@pytest.mark.parametrize("name", sorted(c.MEASURES))
def test_auto_at_threshold_zero_equals_first_exit(calibrated, name, monkeypatch):
    first, _, _ = tokens(calibrated, Mode.fixed(2))
    monkeypatch.setattr(calibrated.config, "confidence", name)  # the measure sortedchat.json names
    got, exits, stats = tokens(calibrated, Mode.auto(threshold=0.0))
    assert got == first and set(exits) == {2}
    assert stats.checks == len(got) and stats.check_seconds > 0


def test_saturation_compares_each_exit_with_the_previous_exit_and_the_first_with_the_embedding(tiny):
    measure = c.make_measure("saturation", tiny)
    ids = encode_chat(tiny, MESSAGES)
    cos = torch.nn.functional.cosine_similarity
    with torch.inference_mode():
        states = tiny.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        h2, h4 = states[2][:, -1], states[4][:, -1]
        measure.prepare(ids)
        measure.reached(h2, 2)
        conf2, logits = measure(h2, 2)
        measure.reached(h4, 4)
        conf4, _ = measure(h4, 4)
    assert logits is None
    assert conf2 == pytest.approx(max(float(cos(h2, states[0][:, -1])), 0.0), abs=1e-6)
    assert conf4 == pytest.approx(max(float(cos(h4, h2)), 0.0), abs=1e-6)


def test_subset_is_the_full_softmax_when_the_vocabulary_is_small(tiny):
    """The tiny vocabulary (~400) is below FREQUENT, so the candidate set is all of it."""
    assert tiny.model.config.vocab_size <= c.FREQUENT
    ids = encode_chat(tiny, MESSAGES)
    full, subset = c.MaxProb(tiny), c.SubsetProb(tiny)
    subset.prepare(ids)
    with torch.inference_mode():
        hs = tiny.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for e in (2, 4):
            assert subset(hs[e][:, -1], e)[0] == pytest.approx(full(hs[e][:, -1], e)[0], rel=1e-5)


def test_subset_scores_frequent_recent_and_previous_top_tokens(tiny, monkeypatch):
    monkeypatch.setattr(c, "FREQUENT", 8)
    monkeypatch.setattr(c, "RECENT", 3)
    monkeypatch.setattr(c, "PREVIOUS_TOP", 2)
    measure = c.SubsetProb(tiny)
    vocab = tiny.model.config.vocab_size
    previous = torch.full((vocab,), -5.0)
    previous[[300, 301]] = 4.0  # the previous head's top two
    measure.observe(0, previous)
    context = [3, 200, 250, 260, 5]  # the last three: 250, 260 and 5 (already frequent)
    measure.prepare(context)
    rows = list(range(8)) + [250, 260, 300, 301]
    with torch.inference_mode():
        h = torch.randn(1, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        logits = tiny.head(h, 2)[0]
        expected = float(torch.softmax(logits[rows], -1).max())
        assert measure(h, 2)[0] == pytest.approx(expected, rel=1e-5)


def test_sortedchat_json_accepts_the_registered_measures(tiny_dir, tmp_path, monkeypatch):
    """The names sortedchat.json may give are the registry's alone: a measure registered in engine/confidence.py
    is accepted, an unknown one stops the session with the file named."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    monkeypatch.setitem(c.MEASURES, "margin", c.MaxProb)
    for name in ("margin", "vibes"):
        (model / "sortedchat.json").write_text(json.dumps({"confidence": name}))
        sm = load_sorted_model(str(model), LoadOptions(device="cpu"))
        if name == "margin":
            assert ChatSession(sm).sm.config.confidence == "margin"
        else:
            with pytest.raises(SortedChatError) as err:
                ChatSession(sm)
            assert str(err.value) == (f"{model / 'sortedchat.json'}: 'confidence' 'vibes' is not a confidence measure "
                                      "(choose maxprob, subset, classifier, saturation, margin)")


def test_unknown_measure_is_one_clear_error(tiny):
    with pytest.raises(SortedChatError, match="unknown confidence measure 'entropy'.*maxprob"):
        c.make_measure("entropy", tiny)


def test_classifier_without_calibration_says_how_to_get_one(tiny):
    with pytest.raises(SortedChatError, match="sortedchat calibrate --measure classifier"):
        c.make_measure("classifier", tiny)


@pytest.mark.parametrize("name", sorted(c.MEASURES))
def test_auto_mode_checks_the_confidences_calibrate_computes(calibrated, monkeypatch, name):
    """Teacher-forced through the engine with no exit passing, auto mode's confidence at every checked exit and
    answer position is the one `calibrate.observe` + `confidences` records there: thresholds are chosen on the
    number auto mode compares with them. The candidate sets are made smaller than the tiny vocabulary so that
    subset and classifier score real subsets; the previous top stays within the greedy head's exactly
    recomputed candidates (`head_product.SCREEN`)."""
    from sortedchat import calibrate as cal

    monkeypatch.setattr(c, "FREQUENT", 96)
    monkeypatch.setattr(c, "RECENT", 6)
    monkeypatch.setattr(c, "PREVIOUS_TOP", 4)
    sm = calibrated
    assert c.FREQUENT < sm.model.config.vocab_size
    prompt = encode_chat(sm, MESSAGES)
    answer = sm.tokenizer("Paris is the capital of France.<|im_end|>", add_special_tokens=False)["input_ids"]
    seen = []  # (measure, exit, confidence) per check
    call = c.MEASURES[name].__call__

    def recorded(measure, hidden, exit_layer):
        conf, logits = call(measure, hidden, exit_layer)
        seen.append((measure, exit_layer, conf))
        return conf, logits

    monkeypatch.setattr(c.MEASURES[name], "__call__", recorded)
    monkeypatch.setattr(sm.config, "confidence", name)  # the measure sortedchat.json names
    session = ChatSession(sm, Mode.auto(threshold=1.0 - 1e-9))  # checked everywhere, never passes
    events = list(session.generate_ids(prompt, SamplingConfig(), forced=answer))
    assert [e.exit_layer for e in events] == [6] * len(answer)
    assert [e for _, e, _ in seen] == [2, 4] * len(answer)
    auto = torch.tensor([conf for _, _, conf in seen]).reshape(len(answer), 2).T

    obs = cal.observe(sm, [(prompt + answer, len(prompt) - 1)])
    assert obs.exits == [2, 4]
    batch = cal.confidences(obs, seen[0][0])  # the very measure auto mode checked with
    # The classifier reads its input rounded to float16 (as it was trained): a last-bit difference between the
    # batched and the one-position hidden state (thread count, summation order) can round one input element
    # the other way, which moves the score by a few 1e-6. Scoring its unrounded input, as before, was 2.3e-5 off.
    torch.testing.assert_close(auto, batch, rtol=0, atol=1e-5 if name == "classifier" else 1e-6)
