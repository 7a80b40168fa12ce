"""`fedvid pretrain` ends with the command that starts a federation from its file: it must
name the file's task and that task's DP recipe, or the command trains the wrong model."""

import shlex

import pytest
from flwr.common.config import parse_config_args

import models.pretrained
from client import cli


@pytest.mark.parametrize("task, trained", [("classify", "head"), ("detect", "heatmap,box"), ("generate", "film,*.norm*")])
def test_the_printed_command_names_the_task_and_its_recipe(task, trained, tmp_path, monkeypatch, capsys):
    def fake_pretrain(config, out, data, epochs, progress):
        assert config.task == task
        return {"history": [{"held-out-x": 0.5}], "chosen-epoch": 1, "epochs": 1, "train-clips": 4,
                "public-data": "public", "classes": ["a", "b"]}

    monkeypatch.setattr(models.pretrained, "pretrain", fake_pretrain)
    out = tmp_path / "weights.pt"
    assert cli.main(["pretrain", "--out", str(out), "--epochs", "1", "--run-config", f'task="{task}"']) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1].split("start a federation from it: ")[1]
    argv = shlex.split(command)
    assert argv[:3] == ["fedvid", "simulate", "--run-config"]
    config = parse_config_args([argv[3]])
    assert config.get("task", "classify") == task
    assert config["init-from"] == str(out)
    assert config["trainable-layers"] == trained
