"""Per-[SEG] attribute labels: from the synthetic referring rows, through the collator, to what the heads learn."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import with_attribute_heads
from hypothesis import given
from hypothesis import strategies as st
from test_trainer import make_sample

from perceptio.data.scene_rendering import DEFAULT_SAMPLING_CONFIG
from perceptio.data.seg_attributes import (
    REFERRED_ATTRIBUTES,
    SEG_ATTRIBUTE_COLUMN,
    SEG_ATTRIBUTES,
    add_seg_attribute_column,
    named_attribute_ids,
    not_named_ids,
    referred_attribute_ids,
    seg_attribute_classes,
    seg_attribute_labels,
    seg_attribute_names,
    seg_attribute_target_for_classes,
)
from perceptio.trainers.collator_perceptio import PerceptioDataCollator
from perceptio.trainers.seg_attribute_accuracy import seg_attribute_accuracy
from perceptio.trainers.training_run import label_seg_attributes


def test_labels_name_what_each_phrase_says_and_nothing_for_rows_without_masks(labelled_rows):
    referring = 0
    for row in labelled_rows:
        labels = row[SEG_ATTRIBUTE_COLUMN]
        assert len(labels) == len(row["masks"])
        if row["task"] != "referring":
            continue
        referring += 1
        meta = json.loads(row["meta"])
        for object_labels, named in zip(labels, meta["named"]):
            for class_id, (attribute, values) in zip(object_labels, SEG_ATTRIBUTES.items()):
                if named[attribute] is None:
                    assert class_id == len(values)
                else:
                    assert values[class_id] == named[attribute] and named[attribute] in meta["expression"]
    assert referring >= 20


def test_classes_count_every_value_and_not_named():
    assert seg_attribute_classes() == [len(values) + 1 for values in SEG_ATTRIBUTES.values()]
    assert not_named_ids() == [classes - 1 for classes in seg_attribute_classes()]


@given(
    named=st.fixed_dictionaries(
        {attribute: st.one_of(st.none(), st.sampled_from(values)) for attribute, values in SEG_ATTRIBUTES.items()}
    )
)
def test_named_attribute_ids_round_trip(named):
    ids = named_attribute_ids(named)
    decoded = {
        attribute: None if class_id == len(values) else values[class_id]
        for class_id, (attribute, values) in zip(ids, SEG_ATTRIBUTES.items())
    }
    assert decoded == named


def test_bad_meta_raises_naming_what_to_do():
    with pytest.raises(ValueError, match="meta\\['named'\\] with one entry per mask.*rebuild the dataset"):
        seg_attribute_labels(json.dumps({"expression": "the cube"}), 1)
    with pytest.raises(ValueError, match="one entry per mask"):
        seg_attribute_labels({"named": [{"shape": "cube"}]}, 2)
    with pytest.raises(ValueError, match="The colour 'teal' is not one of"):
        seg_attribute_labels({"named": [{"colour": "teal"}]}, 1)
    with pytest.raises(ValueError, match="meta\\['referred'\\] with one entry per mask"):
        seg_attribute_labels({"named": [{"shape": "cube"}]}, 1, "referred")
    facts = {"colour": "red", "shape": "cube", "size": "small", "nearness_rank": 0, "column_rank": 0}
    too_far = DEFAULT_SAMPLING_CONFIG.max_objects
    with pytest.raises(ValueError, match=f"nearness_rank {too_far} is not one of"):
        seg_attribute_labels({"referred": [{**facts, "nearness_rank": too_far}]}, 1, "referred")
    with pytest.raises(ValueError, match="must be one of \\('named', 'referred'\\), got 'phrase'"):
        seg_attribute_labels({"named": [{"shape": "cube"}]}, 1, "phrase")
    assert seg_attribute_labels("{}", 0) == [] == seg_attribute_labels("{}", 0, "referred")


def test_referred_labels_are_each_objects_own_attributes_and_ranks(labelled_rows):
    rows = add_seg_attribute_column(labelled_rows.remove_columns(SEG_ATTRIBUTE_COLUMN), "referred")
    referring = rows.filter(lambda task: task == "referring", input_columns="task")
    assert len(referring) >= 20
    for row in referring:
        meta = json.loads(row["meta"])
        decoded = [
            {attribute: values[class_id] for class_id, (attribute, values) in zip(ids, REFERRED_ATTRIBUTES.items())}
            for ids in row[SEG_ATTRIBUTE_COLUMN]
        ]
        assert decoded == meta["referred"]
    # A superlative's labels differ from what its phrase names: the named ones leave colour or shape unnamed.
    superlatives = [json.loads(meta) for meta in referring["meta"] if json.loads(meta)["kind"] == "superlative"]
    assert superlatives and any(
        seg_attribute_labels(meta, 1) != seg_attribute_labels(meta, 1, "referred")[:1] for meta in superlatives
    )


@given(
    referred=st.fixed_dictionaries(
        {attribute: st.sampled_from(values) for attribute, values in REFERRED_ATTRIBUTES.items()}
    )
)
def test_referred_attribute_ids_round_trip(referred):
    ids = referred_attribute_ids(referred)
    assert {attribute: values[i] for i, (attribute, values) in zip(ids, REFERRED_ATTRIBUTES.items())} == referred


def test_each_target_sizes_its_heads_and_is_found_from_them():
    assert seg_attribute_names("referred") == ["colour", "shape", "size", "nearness_rank", "column_rank"]
    ranks = DEFAULT_SAMPLING_CONFIG.max_objects
    assert seg_attribute_classes("referred") == [len(values) for values in SEG_ATTRIBUTES.values()] + [ranks, ranks]
    for target in ("named", "referred"):
        assert seg_attribute_target_for_classes(seg_attribute_classes(target)) == target
    with pytest.raises(ValueError, match="heads have \\[4, 3\\] classes.*'named'.*'referred'"):
        seg_attribute_target_for_classes([4, 3])


def test_training_runs_label_the_target_the_heads_are_sized_for(labelled_rows):
    rows = labelled_rows.remove_columns(SEG_ATTRIBUTE_COLUMN)
    for target in ("named", "referred"):
        labelled = label_seg_attributes(rows, seg_attribute_classes(target))
        assert labelled[SEG_ATTRIBUTE_COLUMN] == add_seg_attribute_column(rows, target)[SEG_ATTRIBUTE_COLUMN]
    with pytest.raises(ValueError, match="heads have \\[4, 3\\] classes"):
        label_seg_attributes(rows, [4, 3])


def test_collator_passes_labels_and_fills_unlabelled_samples(tiny_pair):
    processor = tiny_pair[1]
    collator = PerceptioDataCollator(processor, depth_tokenizer=tiny_pair[0].depth_tokenizer, max_num_tiles=1)
    labelled = {**make_sample(0, 2, False), SEG_ATTRIBUTE_COLUMN: [[1, 2, 0], [8, 3, 2]]}
    batch = collator([labelled, make_sample(1, 1, False), make_sample(2, 0, False)])
    assert [labels.tolist() for labels in batch[SEG_ATTRIBUTE_COLUMN]] == [
        [[1, 2, 0], [8, 3, 2]],
        [[-100, -100, -100]],
        [],
    ]
    assert batch[SEG_ATTRIBUTE_COLUMN][2].shape == (0, 3)
    assert SEG_ATTRIBUTE_COLUMN not in collator(
        [make_sample(1, 1, False), {**make_sample(2, 0, False), SEG_ATTRIBUTE_COLUMN: []}]
    )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([[1, 2, 0]], "one row of integer class ids per mask \\(2\\), got shape \\(1, 3\\)"),
        ([[1, 2], [0]], "one list of integer class ids per mask"),
        ([["red", "cube"], ["blue", "cube"]], "one list of integer class ids per mask"),
    ],
)
def test_collator_rejects_labels_that_do_not_match_the_masks(tiny_pair, labels, message):
    collator = PerceptioDataCollator(tiny_pair[1], depth_tokenizer=tiny_pair[0].depth_tokenizer, max_num_tiles=1)
    with pytest.raises(ValueError, match=f"sample 0 .*{message}"):
        collator([{**make_sample(0, 2, False), SEG_ATTRIBUTE_COLUMN: labels}])


# The referred target's five frozen random heads (ranks among them) take the states longer to satisfy.
@pytest.mark.parametrize(("target", "steps", "loss_ratio"), [("named", 60, 0.3), ("referred", 100, 0.45)])
def test_the_heads_teach_the_seg_states_what_their_phrases_name(
    tiny_pair, labelled_rows, single_torch_thread, target, steps, loss_ratio
):
    """Overfit one batch of real referring rows on the attribute term alone, with the heads frozen at their random
    init: only the language model learns, and its [SEG] states come to carry each phrase's attributes (or, for the
    "referred" target, each referred object's attributes and ranks)."""
    model, processor = tiny_pair
    with_heads = with_attribute_heads(model, seg_attribute_classes(target))
    rows = labelled_rows.select([i for i, task in enumerate(labelled_rows["task"]) if task == "referring"][:8])
    rows = add_seg_attribute_column(rows.remove_columns(SEG_ATTRIBUTE_COLUMN), target)
    collator = PerceptioDataCollator(processor, depth_tokenizer=model.depth_tokenizer, max_num_tiles=1)
    batch = collator([{**row, "use_depth_block": False} for row in rows])
    labels = torch.cat(batch[SEG_ATTRIBUTE_COLUMN])
    before = seg_attribute_accuracy(with_heads, processor, rows, batch_size=3)
    assert before.num_seg == labels.shape[0] and min(before.accuracy.values()) < 1.0
    with_heads.seg_attribute_heads.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in with_heads.parameters() if p.requires_grad], lr=3e-3)
    with_heads.train()
    losses = []
    for _ in range(steps):
        loss = with_heads(**batch).loss_seg_attribute
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < loss_ratio * losses[0]
    after = seg_attribute_accuracy(with_heads, processor, rows, batch_size=3)
    assert after.accuracy == dict.fromkeys(seg_attribute_names(target), 1.0)
    kinds = {json.loads(meta)["kind"] for meta in rows["meta"]}
    assert len(kinds) >= 2 and after.by_kind == dict.fromkeys(kinds, after.accuracy)
    assert set(before.by_kind) == kinds and before.by_kind != after.by_kind
    assert after.majority_prior == before.majority_prior
    for column, name in enumerate(seg_attribute_names(target)):
        majority = labels[:, column].mode().values
        assert after.majority_prior[name] == pytest.approx(
            float((labels[:, column] == majority).float().mean()), abs=1e-4
        )


def test_seg_attribute_accuracy_needs_heads_and_rows_with_masks(tiny_pair, tiny_attribute_model, labelled_rows):
    processor = tiny_pair[1]
    with pytest.raises(ValueError, match="The model has no seg_attribute_heads"):
        seg_attribute_accuracy(tiny_pair[0], processor, labelled_rows)
    with pytest.raises(ValueError, match="heads have \\[4, 3\\] classes"):
        seg_attribute_accuracy(tiny_attribute_model, processor, labelled_rows)
    referred = with_attribute_heads(tiny_pair[0], seg_attribute_classes("referred"))
    scored = seg_attribute_accuracy(referred, processor, labelled_rows.select(range(12)), batch_size=4)
    assert list(scored.accuracy) == seg_attribute_names("referred"), "rows labelled by name are relabelled"
    answers = labelled_rows.filter(lambda task: task != "referring", input_columns="task")
    config = copy.deepcopy(tiny_pair[0].config)
    config.seg_attribute_classes = seg_attribute_classes()
    with pytest.raises(ValueError, match="No row has masks"):
        seg_attribute_accuracy(type(tiny_pair[0])(config), processor, answers)
