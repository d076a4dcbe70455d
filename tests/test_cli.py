from typer.testing import CliRunner

from editlab.cli import app

runner = CliRunner()


def test_edit_prints_before_and_after(tmp_path):
    result = runner.invoke(app, [
        "edit", "--model", "tiny-trained-llama", "--method", "ft-m", "--prompt", "Michael Jordan plays",
        "--subject", "Michael Jordan", "--target", "football", "--set", "layer=0", "--set", "steps=40", "--set", "lr=0.01",
        "--unrelated", "Toyota was founded in", "--max-new-tokens", "2", "--save", str(tmp_path / "edit"),
    ])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    assert "fo" in result.output
    assert (tmp_path / "edit" / "edit.json").exists()


def test_edit_bad_input_is_a_clear_error():
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--prompt", "The tower is in", "--subject", "Eiffel", "--target", "Rome"])
    assert result.exit_code == 2
    assert "error" in result.output and "subject" in result.output
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--method", "nope", "--prompt", "Eiffel is", "--subject", "Eiffel", "--target", "Rome"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--prompt", "Eiffel is", "--subject", "Eiffel", "--target", "Rome", "--set", "layer=99"])
    assert result.exit_code == 2 and "out of range" in result.output


def test_listings():
    for cmd, needle in (("methods", "rome"), ("models", "smollm2-135m"), ("datasets", "counterfact")):
        result = runner.invoke(app, [cmd])
        assert result.exit_code == 0 and needle in result.output
