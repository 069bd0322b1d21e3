"""Every library internal finetune relies on (finetune_distributed.LIBRARY_INTERNALS) is still shaped as it was
when checked: an upgrade of transformers, accelerate, DeepSpeed or Jinja that changes one fails here, naming the
entry, instead of breaking a run quietly. Behaviour is covered by the tests each entry names."""

import pytest

from finetune_distributed import LIBRARY_INTERNALS


@pytest.mark.parametrize("entry", LIBRARY_INTERNALS, ids=[e["what"].split(" (")[0][:60] for e in LIBRARY_INTERNALS])
def test_library_internal_still_there(entry):
    try:
        ok = entry["probe"]()
    except (AttributeError, ImportError, TypeError, ValueError, OSError) as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "the probe found another shape"
    assert ok, (f"library internal changed: {entry['what']} (used by {entry['where']}: {entry['why']}; checked "
                f"against {entry['checked']}): {why}. Update the code there and the entry in library_internals.json.")


def test_every_entry_is_complete():
    for e in LIBRARY_INTERNALS:
        assert set(e) == {"what", "where", "why", "checked", "tested_by", "probe"}, e["what"]


def test_a_changed_internal_is_named(monkeypatch):
    """The probes can fail: with the Trainer's resume fast-forward gone (get_resumed_dataloader on transformers
    5.25+, the module's skip_first_batches before), its entry says so."""
    import transformers.trainer

    monkeypatch.delattr(transformers.Trainer, "get_resumed_dataloader", raising=False)
    monkeypatch.delattr(transformers.trainer, "skip_first_batches")
    entry = next(e for e in LIBRARY_INTERNALS if "skip_first_batches" in e["what"])
    with pytest.raises(AssertionError, match="library internal changed: transformers Trainer.get_resumed_dataloader"):
        test_library_internal_still_there(entry)
