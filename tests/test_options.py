"""Options: one typed dataclass per method family, presets, keywords that override them, checked once."""

import pytest

import dunegrass as dg


def test_keywords_override_a_preset_and_unknown_ones_list_the_fields(tiny_classification):
    model, _, _ = tiny_classification
    task = dg.ClassificationTask()
    attr = dg.GradientInfluence(model, task, options=dg.InfluenceOptions.preset("low_memory"), batch_size=5)
    assert attr.options.batch_size == 5 and attr.options.store_dtype == "float16"
    with pytest.raises(dg.DunegrassError, match="unexpected keyword.*batchsize.*batch_size"):
        dg.GradientInfluence(model, task, batchsize=5)
    daunce = dg.Daunce(model, task, options=dg.DaunceOptions.preset("llm"), num_models=4, lr=1e-2)
    assert daunce.options.lora is not None and daunce.options.recipe.lr == 1e-2 and daunce.num_models == 4
    assert daunce.describe()["train"]["optimizer"] == "adamw"  # the LoRA recipe, with the lr override


def test_the_keywords_of_the_last_release_still_work_with_a_warning(tiny_classification):
    model, train, test = tiny_classification
    task = dg.ClassificationTask()
    with pytest.warns(FutureWarning, match="train_signal= and query_signal="):
        assert dg.Daunce(model, task, signal="margin").options.query_signal == "margin"
    with pytest.warns(FutureWarning, match="train_batch_size="):
        assert dg.Daunce(model, task, batch_size=8).options.recipe.batch_size == 8
    with pytest.warns(FutureWarning, match="mask_size="):
        assert dg.GraSS(model, task, k=8, mask_dim=24).mask_size == 24
    with pytest.warns(FutureWarning, match="mask="):
        assert dg.FactGraSS(model, task, masks="random").mask == "random"
    with pytest.warns(FutureWarning, match="checkpoint_weights="):
        dg.TracIn(model, task, learning_rates=[1.0])
    with pytest.warns(FutureWarning, match="positional cache_dir"):
        dg.TracIn(model, task).fit(train, None)
    with pytest.raises(TypeError):
        dg.GraSS(model, task, 16)  # sizes are keywords: a positional 16 was ambiguous


def test_options_are_checked_where_they_are_made():
    for bad, match in (
        ({"damping": -1.0}, "damping must be a positive finite number"),
        ({"store_dtype": "int8"}, "store_dtype must be one of"),
        ({"train_signal": "margin"}, "train_signal must be one of"),
    ):
        with pytest.raises(dg.DunegrassError, match=match):
            dg.InfluenceOptions(**bad)
    for bad, match in (
        ({"variant": "exact"}, "variant must be one of"),
        ({"subsample_ratio": 0.0}, "subsample_ratio"),
        ({"lora": True, "trainer": "ensemble"}, "LoRA trains member by member"),
    ):
        with pytest.raises(dg.DunegrassError, match=match):
            dg.DaunceOptions(**bad)
