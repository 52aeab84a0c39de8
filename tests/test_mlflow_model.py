"""The MLflow pyfunc signature of the trained model."""

from pgdpo.mlflow_model import DEFAULT_PARAMS, model_signature


def test_signature_seed_column_optional():
    signature = model_signature()

    assert signature.inputs.required_input_names() == ["prompt"]
    assert signature.inputs.optional_input_names() == ["seed"]
    assert signature.outputs.input_names() == ["prompt", "seed", "video_path"]
    assert {param.name for param in signature.params.params} == set(DEFAULT_PARAMS)
