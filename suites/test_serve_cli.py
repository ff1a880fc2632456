"""``engine serve``'s command line: every EngineConfig setting is a dashed flag with the engine's default."""

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from engine.llm import EngineConfig
from engine.serve.config import parse_args


def test_every_engine_setting_is_a_dashed_flag_with_the_engines_default():
    config = parse_args([])
    assert config.engine == EngineConfig()
    assert (config.model, config.host, config.port, config.device) == ("tiny-qwen3", "127.0.0.1", 8000, None)
    config = parse_args(["--block-size", "32", "--num-kv-blocks", "64", "--no-enable-prefix-caching",
                         "--max-num-seqs", "3", "--max-num-batched-tokens", "128", "--max-model-len", "512",
                         "--hash-algorithm", "blake2b", "--served-model-name", "m", "--port", "0"])
    assert config.engine == EngineConfig(32, 64, False, 3, 128, 512, "blake2b")
    assert (config.model_name, config.port) == ("m", 0)
    assert parse_args(["--model", "tiny-llama"]).model_name == "tiny-llama"


@pytest.mark.parametrize(("argv", "message"), [
    (["--block-size", "12"], "block_size must be a power of two, got 12"),
    (["--max-num-seqs", "0"], "max_num_seqs must be >= 1, got 0"),
    (["--hash-algorithm", "md5"], "invalid choice: 'md5'"),
    (["--num-kv-blocks", "many"], "invalid int value: 'many'"),
])
def test_a_bad_engine_setting_ends_the_command_with_the_engines_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    [str(Path(sys.executable).with_name("engine")), "serve"],  # the console script
    [sys.executable, "-m", "engine.serve"],
])
def test_both_spellings_of_the_command_list_every_setting(command):
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True, timeout=60).stdout
    flags = ["--" + setting.name.replace("_", "-") for setting in fields(EngineConfig)]
    for flag in [*flags, "--no-enable-prefix-caching", "--model", "--device", "--host", "--port",
                 "--served-model-name"]:
        assert flag in shown
