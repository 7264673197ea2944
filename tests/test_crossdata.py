"""Cross-dataset evaluation: class mapping by name or polarity, end to end through ``hclafter eval``."""
import json

import numpy as np
import pytest

from hclafter.apps.cli import main
from hclafter.apps.crossdata import BY_NAME, BY_POLARITY, MappingError, class_mapping
from hclafter.core.emotions import EKMAN6, MIKELS8, Wheel
from hclafter.engine.evaluation import Predictions

from .conftest import TINY_CONFIG

# One short epoch on few images of the "clean" world: the mapping is under test, not the accuracy.
SMALL = ["data.synthetic.per_class=8", "data.synthetic.world=clean", "text.steps=30",
         "train.phases=[{epochs: 1, train: [stage_adapters, fusion, classifier]}]"]
ONE_POLARITY = "name: calm\nclasses: [calm, serene]\npolarity: [1, 1]\n"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("clean_run")
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}", *SMALL]) == 0
    return out


def _preds(logits, labels, num_classes):
    logits = np.asarray(logits, dtype=float)
    return Predictions(logits, np.stack([logits, logits]), np.asarray(labels), np.full((len(labels), num_classes),
                       1.0 / num_classes), np.arange(len(labels)))


def test_classes_are_mapped_by_name_not_by_index():
    reordered = Wheel("reordered", tuple(reversed(MIKELS8.classes)), tuple(reversed(MIKELS8.polarity)))
    mapping = class_mapping(MIKELS8, reordered)
    assert mapping.kind == BY_NAME and mapping.wheel == reordered
    logits = np.eye(8)  # image i: the run predicts its class i
    mapped = mapping.apply(_preds(logits, range(8), 8))
    predicted = [reordered.classes[j] for j in mapped.logits.argmax(1)]
    assert predicted == list(MIKELS8.classes)
    assert mapped.stage_logits.shape == (2, 8, 8)
    # a dataset with some of the run's classes: scored over those classes' logits
    subset = class_mapping(MIKELS8, Wheel("two", ("fear", "awe"), (0, 1)))
    assert subset.kind == BY_NAME and subset.columns == (4, 2)


def test_polarity_is_the_larger_summed_probability():
    mapping = class_mapping(MIKELS8, EKMAN6)
    assert mapping.kind == BY_POLARITY and mapping.wheel.classes == ("positive", "negative")
    # amusement is the top class, but the negative classes hold more probability together
    probs = np.array([[0.3, 0, 0, 0, 0.25, 0.25, 0.2, 0], [0.2, 0.2, 0.2, 0.1, 0.3, 0, 0, 0]]) + 1e-12
    labels = [EKMAN6.index("joy"), EKMAN6.index("anger")]
    mapped = mapping.apply(_preds(np.log(probs), labels, 6))
    assert mapped.logits.argmax(1).tolist() == [1, 0]  # negative, positive
    assert np.exp(mapped.logits) == pytest.approx(np.array([[0.3, 0.7], [0.7, 0.3]]), abs=1e-9)
    assert mapped.labels.tolist() == [0, 1]
    assert mapped.distributions.sum(1) == pytest.approx([1.0, 1.0])


def test_a_mapping_that_does_not_exist_is_refused():
    calm = Wheel("calm", ("calm", "serene"), (1, 1))
    with pytest.raises(MappingError, match="not by polarity, as the dataset's label space calm has no negative class"):
        class_mapping(MIKELS8, calm)
    with pytest.raises(MappingError, match="the run's label space calm has no negative class"):
        class_mapping(calm, EKMAN6)


def _eval(run, capsys, *args):
    capsys.readouterr()
    assert main(["eval", str(run), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_another_world_through_the_cli(clean_run, capsys):
    result = _eval(clean_run, capsys, "--data", "synthetic:", "data.synthetic.world=blur")
    assert result["mapping"] == BY_NAME and result["split"] == "test" and result["random_init"]
    assert result["dataset"]["format"] == "synthetic" and result["dataset"]["world"] == "blur"
    assert result["classes"] == list(MIKELS8.classes)
    assert result["num_images"] == result["metrics"]["num_samples"] == 8
    # the run's own world through the same path reproduces plain `eval` (whose saved splits hold the
    # vote distributions rounded, hence LDL metrics equal to float precision only)
    same = _eval(clean_run, capsys, "--data", "synthetic:", "data.synthetic.world=clean")
    own = _eval(clean_run, capsys)
    assert same["metrics"]["ldl"] == pytest.approx(own.pop("ldl"), rel=1e-6)
    same["metrics"].pop("ldl")
    assert same["metrics"] == own
    assert result["metrics"] != same["metrics"]


def test_eval_by_polarity_through_the_cli(clean_run, capsys):
    result = _eval(clean_run, capsys, "--data", "synthetic:", "data.label_space=ekman6")
    assert result["mapping"] == BY_POLARITY and result["label_space"] == "polarity2"
    assert result["dataset"]["label_space"] == "ekman6" and result["num_images"] == 6
    metrics = result["metrics"]
    assert metrics["accuracy"] == metrics["polarity_accuracy"]
    assert len(metrics["stage_accuracy"]) == 3 and len(metrics["confusion_matrix"]) == 2


def test_refused_mapping_and_bad_arguments_exit_2(clean_run, tmp_path, capsys):
    (tmp_path / "calm.yaml").write_text(ONE_POLARITY)
    assert main(["eval", str(clean_run), "--data", "synthetic:", f"data.wheel_file={tmp_path / 'calm.yaml'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot map the run's classes" in err and "no negative class" in err
    assert main(["eval", str(clean_run), "model.prompt_tokens=3"]) == 2
    assert "takes only data.* overrides" in capsys.readouterr().err
    assert main(["eval", str(clean_run), "--data", "nosuch:/x"]) == 2
    assert "unknown format 'nosuch'" in capsys.readouterr().err
