"""The console script, run as a user would."""
import subprocess
import sys

import pytest

from seekv4.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "seekv4.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_full_size_deepseek_v3_matches_published_sizes(capsys):
    assert main(["info", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    # DeepSeek-V3: 671B total, 37B activated per token; MLA caches (512 + 64) elements per token per layer
    assert "total 671,026,404,352 (671.03B)" in out
    assert "(37.55B)" in out
    assert "35,136 elements = 70,272 bytes in bf16" in out
    assert "3-60       mla          moe" in out


def test_info_deepseek_v4_flash_matches_published_sizes(capsys):
    assert main(["info", "deepseek-v4-flash"]) == 0
    out = capsys.readouterr().out
    # V4-Flash: 284B total / 13B active (model card), plus one MTP block (~7B, ~1B active) that we count;
    # CSA layers keep (512 + 128) / 4 elements per token, HCA layers 512 / 128
    total = int(out.split("total ")[1].split(" ")[0].replace(",", ""))
    active = int(out.split("active per token ")[1].split(" ")[0].replace(",", ""))
    assert 280e9 < total < 292e9 and 12.5e9 < active < 15e9
    assert "2          v4/csa       hash_moe                     160.0" in out
    assert "3          v4/hca       moe                            4.0" in out


def test_info_on_saved_folder_and_gqa_kv_bytes(tmp_path, capsys):
    from seekv4 import SeekV4Config

    SeekV4Config.from_preset("tiny-gqa").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 4 layers x (keys + values) x 2 kv heads x head_dim 16 = 256 elements per token
    assert "256 elements = 512 bytes in bf16" in out


def test_generate_console_script():
    proc = subprocess.run(["seekv4", "generate", "--model", "tiny", "--prompt", "def f(", "--max-new-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f(")
    assert "5 new tokens" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["info", "no-such-model"], "neither a preset nor an existing folder"),
    (["generate", "--model", "tiny", "--prompt", ""], "--prompt is empty"),
])
def test_cli_errors_are_clear(args, message):
    proc = run(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_rejects_bad_arguments():
    proc = run("generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "0")
    assert proc.returncode == 2 and "--max-new-tokens must be >= 1" in proc.stderr
